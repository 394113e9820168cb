"""Routing between capsule layers: a registry of algorithms, each a module with its own config.

Shape legend (suffixes on tensor names):
    B  batch
    I  input (child) capsules, e.g. 1,152 primary capsules
    J  output (parent) capsules, e.g. 10 class capsules
    D  output pose dimension, e.g. 16

Every routing module takes the prediction vectors u_hat [B, I, J, D] (and, if its class sets
``needs_activations``, the children's activations a [B, I]) and returns a ``RoutingOutput``:
parent poses, parent activations and the couplings. ``ClassCapsules`` builds its routing from
the config through ``build_routing``, so an algorithm with learned parameters or one that needs
input activations is added here, as one ``ROUTINGS`` entry, without touching its callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from capscore.functional import squash


@dataclass
class RoutingOutput:
    poses: torch.Tensor
    """[B, J, D] parent capsules v_j."""
    activations: torch.Tensor
    """[B, J] how present each parent is (the length |v_j| for dynamic routing), in float32."""
    couplings: torch.Tensor
    """[B, I, J] the coupling coefficients of the final iteration."""


def dynamic_routing(
    u_hat_BIJD: torch.Tensor,
    iterations: int,
    detach_inner: bool = False,
    bias_JD: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing-by-agreement (Sabour et al. 2017, Procedure 1).

    Args:
        u_hat_BIJD: prediction vectors u_hat_{j|i} = W_ij u_i.
        iterations: r >= 1; r = 1 gives uniform couplings 1/J.
        detach_inner: stop gradients through u_hat in every iteration but the last (the
            official code does not, hence off by default).
        bias_JD: optional bias added to s_j before squashing (the official code's, opt-in).

    Returns:
        (v_BJD, c_BIJ): parent capsules and the couplings used in the last iteration.
    """
    if iterations < 1:
        raise ValueError(f"routing iterations must be >= 1, got {iterations}")
    B, I, J, _ = u_hat_BIJD.shape
    # b_ij are per-example routing logits: they start at zero on every call (not a parameter,
    # not shared across the batch). Kept at [B, I, J], never at u_hat's [B, I, J, D], and in
    # at least float32 so the agreement sums do not accumulate in bf16/fp16 under autocast.
    b_BIJ = u_hat_BIJD.new_zeros(
        B, I, J, dtype=torch.promote_types(u_hat_BIJD.dtype, torch.float32)
    )
    # Both sums over I run as batched row-vector x matrix products over (B, J): c_j^T U_j and
    # v_j^T U_j^T. (einsum lowers them to slow bmm shapes on CPU; see BENCHMARKS.md.)
    u_BJID = u_hat_BIJD.transpose(1, 2)
    u_inner_BJID = u_BJID.detach() if detach_inner else u_BJID
    for it in range(iterations):
        last = it == iterations - 1
        u = u_BJID if last else u_inner_BJID
        c_BIJ = torch.softmax(b_BIJ, dim=2)  # over parents J: each child splits its vote
        c_BJ1I = c_BIJ.transpose(1, 2).unsqueeze(2).to(u.dtype)
        s_BJD = (c_BJ1I @ u).squeeze(2)  # s_j = sum_i c_ij u_hat_j|i
        if bias_JD is not None:
            s_BJD = s_BJD + bias_JD
        v_BJD = squash(s_BJD)
        if not last:  # agreement update; none after the final iteration
            a_BJ1I = v_BJD.unsqueeze(2) @ u.transpose(2, 3)  # u_hat_j|i . v_j
            b_BIJ = b_BIJ + a_BJ1I.squeeze(2).transpose(1, 2).to(b_BIJ.dtype)
    return v_BJD, c_BIJ


# --- registered algorithms ------------------------------------------------------------------


@dataclass(kw_only=True)
class DynamicRoutingConfig:
    """Routing-by-agreement, Sabour et al. 2017."""

    name: Literal["dynamic"] = "dynamic"
    """Registry key (fixed per config class)."""
    iterations: int = 3
    """Routing iterations r (1 = uniform coupling 1/J, no agreement step)."""
    detach_inner: bool = False
    """Stop gradients through u_hat in all but the last iteration (faster, not the paper)."""
    bias: bool = False
    """Add a learned bias to s_j before squashing, as the official code does (not in 6.8M)."""

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"routing.iterations must be an integer >= 1, got {self.iterations!r}")


class DynamicRouting(nn.Module):
    """Procedure 1 of Sabour et al. 2017 as a module (its only parameter: the optional bias)."""

    needs_activations = False

    def __init__(self, config: DynamicRoutingConfig, *, num_in: int, num_out: int, out_dim: int):
        super().__init__()
        self.config = config
        self.bias_JD = nn.Parameter(torch.zeros(num_out, out_dim)) if config.bias else None

    def forward(self, u_hat_BIJD: torch.Tensor, a_BI: torch.Tensor | None = None) -> RoutingOutput:
        cfg = self.config
        v_BJD, c_BIJ = dynamic_routing(u_hat_BIJD, cfg.iterations, cfg.detach_inner, self.bias_JD)
        return RoutingOutput(poses=v_BJD, activations=v_BJD.float().norm(dim=-1), couplings=c_BIJ)


RoutingConfig = DynamicRoutingConfig
"""Any registered routing config (a union once there are several)."""


@dataclass(frozen=True)
class RoutingSpec:
    """One routing algorithm: its module class and its keyword-only config class."""

    module: type[nn.Module]
    config: type
    description: str


ROUTINGS: dict[str, RoutingSpec] = {
    "dynamic": RoutingSpec(
        DynamicRouting, DynamicRoutingConfig, "routing-by-agreement (Sabour et al. 2017)"
    ),
}
"""Routing algorithms by config name (`model.routing.name`); a new algorithm is one entry."""


def routing_config(value: RoutingConfig | dict[str, Any] | None = None) -> RoutingConfig:
    """A routing config from a config object or a dict such as {"name": "dynamic", ...}."""
    if value is None:
        return DynamicRoutingConfig()
    if isinstance(value, dict):
        value = dict(value)
        name = value.pop("name", "dynamic")
        if name not in ROUTINGS:
            raise ValueError(f"routing.name must be one of {sorted(ROUTINGS)}, got {name!r}")
        try:
            return ROUTINGS[name].config(**value)
        except TypeError as err:  # an unknown keyword
            raise ValueError(f"routing ({name}): {err}") from None
    spec = ROUTINGS.get(getattr(value, "name", None))  # type: ignore[arg-type]
    if spec is None or not isinstance(value, spec.config):
        raise ValueError(f"routing must be one of {sorted(ROUTINGS)}'s configs, got {value!r}")
    return value


def build_routing(config: RoutingConfig, *, num_in: int, num_out: int, out_dim: int) -> nn.Module:
    """The routing module for `config` between num_in children and num_out parents."""
    spec = ROUTINGS[config.name]
    return spec.module(config, num_in=num_in, num_out=num_out, out_dim=out_dim)
