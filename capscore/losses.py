"""Losses: pure functions of model outputs and targets (no module state)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class LossParts:
    """A scalar total and its named, already weighted parts (total == sum(parts))."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]

    def __getattr__(self, name: str) -> torch.Tensor:  # loss.margin, loss.reconstruction
        parts = self.__dict__.get("parts", {})
        if name in parts:
            return parts[name]
        raise AttributeError(name)


def as_multi_hot(targets: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Class indices [B] or a multi-hot [B, J] -> float [B, J]."""
    if targets.dim() == 1:
        return F.one_hot(targets.long(), num_classes).to(dtype)
    if targets.shape[1] != num_classes:
        raise ValueError(
            f"multi-hot targets have {targets.shape[1]} classes, expected {num_classes}"
        )
    return targets.to(dtype)


def margin_loss(
    lengths: torch.Tensor,
    targets: torch.Tensor,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lam: float = 0.5,
) -> torch.Tensor:
    """L_k = T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2 (paper eq. 4).

    Summed over classes, averaged over the batch. Targets: indices [B] or multi-hot [B, J].
    """
    lengths = lengths.float()
    T_BJ = as_multi_hot(targets, lengths.shape[1], lengths.dtype)
    present = T_BJ * F.relu(m_pos - lengths).pow(2)
    absent = lam * (1.0 - T_BJ) * F.relu(lengths - m_neg).pow(2)
    return (present + absent).sum(dim=1).mean()


def reconstruction_loss(
    reconstructions: torch.Tensor, images: torch.Tensor, weight: float = 0.0005
) -> torch.Tensor:
    """weight * per-image SUM of squared errors, averaged over the batch (paper: 0.0005).

    Reconstructions and images [B, C, H, W], or [B, K, C, H, W] for K objects per input, each
    reconstructed on its own: then the K errors are summed per input (MultiMNIST)."""
    if reconstructions.shape != images.shape:
        raise ValueError(
            f"reconstructions {tuple(reconstructions.shape)} and their targets "
            f"{tuple(images.shape)} differ in shape"
        )
    sse_B = (reconstructions.float() - images.float()).pow(2).flatten(1).sum(dim=1)
    return weight * sse_B.mean()


def capsnet_loss(
    lengths: torch.Tensor,
    reconstructions: torch.Tensor | None,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lam: float = 0.5,
    reconstruction_weight: float = 0.0005,
) -> LossParts:
    """Margin loss + weighted reconstruction loss, with both parts kept for reporting."""
    parts = {"margin": margin_loss(lengths, targets, m_pos, m_neg, lam)}
    if reconstructions is not None:
        parts["reconstruction"] = reconstruction_loss(
            reconstructions, images, reconstruction_weight
        )
    return LossParts(total=sum(parts.values()), parts=parts)  # type: ignore[arg-type]


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> LossParts:
    """Cross-entropy for single labels, binary cross-entropy per class for multi-hot targets."""
    logits = logits.float()
    if targets.dim() == 1:
        loss = F.cross_entropy(logits, targets.long())
        return LossParts(total=loss, parts={"cross_entropy": loss})
    loss = F.binary_cross_entropy_with_logits(logits, targets.float())
    return LossParts(total=loss, parts={"bce": loss})
