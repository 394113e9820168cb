"""The capsule non-linearity, shared by layers and routing."""

from __future__ import annotations

import torch


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """v = |s|^2 / (1 + |s|^2) * s / |s|  (paper eq. 1): keeps direction, length in [0, 1).

    Written as s * |s| / (1 + |s|^2) with |s| clamped away from zero, so the value and the
    gradient at s = 0 are exactly 0 and finite (the true limits), without an epsilon that would
    bias short vectors. Computed in float32 at least, since fp16 underflows |s|^2 for short s.
    """
    s32 = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    sq = s32.pow(2).sum(dim=dim, keepdim=True)
    norm = sq.clamp_min(torch.finfo(s32.dtype).tiny).sqrt()
    return (s32 * (norm / (1.0 + sq))).to(s.dtype)
