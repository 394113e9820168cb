"""Routing between capsule layers.

Shape legend (suffixes on tensor names):
    B  batch
    I  input (child) capsules, e.g. 1,152 primary capsules
    J  output (parent) capsules, e.g. 10 class capsules
    D  output pose dimension, e.g. 16
"""

from __future__ import annotations

import torch

from capscore.layers import squash


def dynamic_routing(
    u_hat_BIJD: torch.Tensor, iterations: int, detach_inner: bool = False,
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
    # not shared across the batch). Kept at [B, I, J], never at u_hat's [B, I, J, D].
    b_BIJ = u_hat_BIJD.new_zeros(B, I, J)
    u_inner_BIJD = u_hat_BIJD.detach() if detach_inner else u_hat_BIJD
    for it in range(iterations):
        last = it == iterations - 1
        u_BIJD = u_hat_BIJD if last else u_inner_BIJD
        c_BIJ = torch.softmax(b_BIJ, dim=2)  # over parents J: each child splits its vote
        s_BJD = torch.einsum("bij,bijd->bjd", c_BIJ.to(u_BIJD.dtype), u_BIJD)
        if bias_JD is not None:
            s_BJD = s_BJD + bias_JD
        v_BJD = squash(s_BJD)
        if not last:  # agreement update; none after the final iteration
            b_BIJ = b_BIJ + torch.einsum("bijd,bjd->bij", u_BIJD, v_BJD).to(b_BIJ.dtype)
    return v_BJD, c_BIJ


ROUTINGS = {"dynamic": dynamic_routing}
"""Routing algorithms by config name; a new algorithm registers here."""
