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


ROUTINGS = {"dynamic": dynamic_routing}
"""Routing algorithms by config name; a new algorithm registers here."""
