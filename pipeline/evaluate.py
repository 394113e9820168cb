"""Exact evaluation: every test sample once across all ranks, counts summed with all_reduce."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pipeline.torch_utils import unwrap


@dataclass
class EvalResult:
    correct: int
    total: int
    loss_sums: dict[str, float]
    confusion: torch.Tensor | None = field(default=None, repr=False)
    """[J, J] counts, rows = true class, columns = predicted (single-label data only)."""
    samples_skipped: int = 0
    """Samples of the split the loader could not read (summed over ranks)."""

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    def mean_losses(self) -> dict[str, float]:
        return {k: v / max(self.total, 1) for k, v in self.loss_sums.items()}

    def per_class_accuracy(self) -> list[float]:
        assert self.confusion is not None
        rows = self.confusion.sum(1).clamp_min(1)
        return (self.confusion.diag() / rows).tolist()


def correct_predictions(scores_BJ: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] bools. Multi-hot targets (k classes present): the top-k scores must be exactly them."""
    if targets.dim() == 1:
        return scores_BJ.argmax(1) == targets
    k = int(targets.sum(1).max())
    top = torch.zeros_like(targets, dtype=torch.bool).scatter_(
        1, scores_BJ.topk(k, 1).indices, True
    )
    return (top == targets.bool()).all(1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
    distributed: bool = False,
) -> EvalResult:
    """Accuracy, summed loss parts and confusion matrix over this rank's share, then summed
    over ranks. The model sees no targets, so CapsNet's decoder is masked by its prediction."""
    # Forward through the plain module: ranks may run one eval batch more or less than each
    # other, and the DDP wrapper's forward can issue collectives.
    inner = unwrap(model)
    num_classes = inner.config.num_classes
    was_training = inner.training
    inner.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = torch.zeros((), dtype=torch.long, device=device)
    sums: dict[str, torch.Tensor] = {}
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for images, targets in loader:
        images, targets = (
            images.to(device, non_blocking=True),
            targets.to(device, non_blocking=True),
        )
        with autocast or nullcontext():
            out = inner(images)
            loss = inner.loss(out, images, targets)
        B = images.shape[0]
        for name, value in loss.parts.items():
            sums[name] = sums.get(name, torch.zeros((), device=device)) + value.float() * B
        correct += correct_predictions(out.scores.float(), targets).sum()
        total += B
        if targets.dim() == 1:
            idx = targets * num_classes + out.scores.argmax(1)
            confusion += torch.bincount(idx, minlength=num_classes**2).view(
                num_classes, num_classes
            )
    inner.train(was_training)
    names = sorted(sums)
    skipped = torch.tensor(float(loader.stats.samples_skipped), device=device)
    if distributed:
        # One fixed-order vector, one collective. Every rank has at least one eval batch (the
        # loader refuses a rank with no data), so all ranks hold the same part names.
        packed = torch.stack(
            [
                correct.float(),
                total.float(),
                skipped,
                *[sums.get(n, torch.zeros((), device=device)) for n in names],
            ]
        )
        dist.all_reduce(packed)
        dist.all_reduce(confusion)
        correct, total, skipped = packed[0].long(), packed[1].long(), packed[2]
        sums = dict(zip(names, packed[3:], strict=True))
    return EvalResult(
        correct=int(correct),
        total=int(total),
        loss_sums={k: float(v) for k, v in sums.items()},
        confusion=confusion.cpu(),
        samples_skipped=int(skipped),
    )


def format_result(result: EvalResult, title: str) -> str:
    lines = [
        title,
        f"samples {result.total}  accuracy {result.accuracy:.4f}  "
        f"error {100 * (1 - result.accuracy):.2f}%",
        "losses " + "  ".join(f"{k} {v:.4f}" for k, v in result.mean_losses().items()),
    ]
    if result.confusion is not None:
        J = result.confusion.shape[0]
        lines.append(
            "per-class accuracy "
            + "  ".join(f"{j}:{a:.3f}" for j, a in enumerate(result.per_class_accuracy()))
        )
        lines.append("confusion (rows true, columns predicted)")
        lines.append("      " + " ".join(f"{p:>6d}" for p in range(J)))
        for t in range(J):
            lines.append(f"{t:>5d} " + " ".join(f"{int(v):>6d}" for v in result.confusion[t]))
    return "\n".join(lines)
