"""Capsule layers: PrimaryCapsules and the class-capsule layer (squash lives in functional).

Shape legend: B batch, C channels, H/W grid, T primary capsule types, P primary pose dim,
I input capsules (= T * H * W), J class capsules, D class pose dim.
"""

from __future__ import annotations

import torch
from torch import nn

from capscore.functional import squash
from capscore.routing import ROUTINGS, RoutingConfig, RoutingOutput, build_routing

__all__ = ["ClassCapsules", "PrimaryCapsules", "squash"]


class PrimaryCapsules(nn.Module):
    """A convolution whose output channels are grouped into T capsule types of P dimensions.

    A capsule is the P channels of one type at one grid position, so the channel axis is
    split as (T, P) and moved next to the grid *before* flattening; flattening the raw
    [B, C, H, W] tensor in memory order would mix positions into one capsule.
    """

    def __init__(self, in_channels: int, types: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.types, self.dim = types, dim
        self.conv = nn.Conv2d(in_channels, types * dim, kernel_size=kernel, stride=stride)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        y = self.conv(x_BCHW)
        B, _, H, W = y.shape
        y_BTPHW = y.view(B, self.types, self.dim, H, W)
        u_BIP = y_BTPHW.permute(0, 1, 3, 4, 2).reshape(B, self.types * H * W, self.dim)
        return squash(u_BIP)


class ClassCapsules(nn.Module):
    """Prediction vectors u_hat_{j|i} = W_ij u_i, then routing to J class capsules.

    W has one P x D matrix per (i, j). u_hat is one batched matmul over I,
    [I, B, P] @ [I, P, J*D], so neither the input is tiled J times nor W copied per sample.
    The routing module comes from the registry (`capscore.routing.ROUTINGS`) by its config.
    """

    def __init__(
        self,
        num_in: int,
        in_dim: int,
        num_out: int,
        out_dim: int,
        *,
        routing: RoutingConfig,
        init_std: float = 0.01,
    ):
        super().__init__()
        self.num_out, self.out_dim = num_out, out_dim
        self.weight_IPK = nn.Parameter(torch.randn(num_in, in_dim, num_out * out_dim) * init_std)
        self.routing = build_routing(routing, num_in=num_in, num_out=num_out, out_dim=out_dim)
        self.routing_name: str = routing.name

    def predictions(self, u_BIP: torch.Tensor) -> torch.Tensor:
        """u_hat [B, I, J, D] (a permuted view of the bmm result; routing reads it as is)."""
        B, I, _ = u_BIP.shape
        u_hat_IBK = torch.bmm(u_BIP.transpose(0, 1), self.weight_IPK)
        return u_hat_IBK.view(I, B, self.num_out, self.out_dim).transpose(0, 1)

    def forward(
        self, u_BIP: torch.Tensor, a_BI: torch.Tensor | None = None, iterations: int | None = None
    ) -> RoutingOutput:
        """Parent poses [B, J, D], activations [B, J] and couplings [B, I, J].

        `a_BI`: the children's activations, for routing algorithms that use them;
        `iterations`: run the routing for this many iterations instead of its config's (for
        algorithms that have iterations; e.g. an inference sweep)."""
        u_hat_BIJD = self.predictions(u_BIP)
        if iterations is None:
            return self.routing(u_hat_BIJD, a_BI)
        if not ROUTINGS[self.routing_name].has_iterations:
            raise ValueError(f"routing {self.routing_name!r} has no iterations setting")
        return self.routing(u_hat_BIJD, a_BI, iterations)
