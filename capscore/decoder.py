"""Masked reconstruction decoder (paper section 4.1, figure 2)."""

from __future__ import annotations

import torch
from torch import nn


def class_mask(lengths_BJ: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """[B, J] mask of the capsules the decoder sees.

    With targets (training): the true class, as indices [B] or a multi-hot [B, J] mask.
    Without targets (evaluation): the predicted class, the longest capsule. The label is never
    used at test time, so test reconstructions show what the network believes.
    """
    if targets is None:
        return nn.functional.one_hot(lengths_BJ.argmax(dim=1), lengths_BJ.shape[1]).to(
            lengths_BJ.dtype
        )
    if targets.dim() == 1:
        return nn.functional.one_hot(targets.long(), lengths_BJ.shape[1]).to(lengths_BJ.dtype)
    return targets.to(lengths_BJ.dtype)


class Decoder(nn.Module):
    """Fully connected J*D -> hidden (ReLU) ... -> C*H*W (sigmoid) from masked class capsules."""

    def __init__(
        self,
        num_classes: int,
        class_dim: int,
        hidden: tuple[int, ...],
        image_shape: tuple[int, int, int],
    ):
        super().__init__()
        self.image_shape = image_shape
        widths = [num_classes * class_dim, *hidden]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(w_in, w_out), nn.ReLU(inplace=True)]
        C, H, W = image_shape
        layers += [nn.Linear(widths[-1], C * H * W), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, poses_BJD: torch.Tensor, mask_BJ: torch.Tensor) -> torch.Tensor:
        masked_BK = (poses_BJD * mask_BJ.unsqueeze(-1)).flatten(1)
        return self.net(masked_BK).view(-1, *self.image_shape)
