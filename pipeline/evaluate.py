"""Exact evaluation: every test sample once across all ranks, counts summed with all_reduce."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.train.checkpoint import unwrap


@dataclass
class EvalResult:
    correct: int
    total: int
    loss_sums: dict[str, float]
    confusion: torch.Tensor | None = field(default=None, repr=False)
    """[J, J] counts, rows = true class, columns = predicted (single-label data only)."""

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
    top = torch.zeros_like(targets, dtype=torch.bool).scatter_(1, scores_BJ.topk(k, 1).indices, True)
    return (top == targets.bool()).all(1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, num_classes: int,
             autocast: AbstractContextManager | None = None, distributed: bool = False,
             ) -> EvalResult:
    """Accuracy, summed loss parts and confusion matrix over this rank's share, then summed
    over ranks. The model sees no targets, so CapsNet's decoder is masked by its prediction."""
    # Forward through the plain module: ranks may run one eval batch more or less than each
    # other, and the DDP wrapper's forward can issue collectives.
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = torch.zeros((), dtype=torch.long, device=device)
    sums: dict[str, torch.Tensor] = {}
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
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
            confusion += torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)
    inner.train(was_training)
    names = sorted(sums)
    if distributed:
        # One fixed-order vector, one collective. Every rank has at least one eval batch (the
        # loader refuses a rank with no data), so all ranks hold the same part names.
        packed = torch.stack([correct.float(), total.float(),
                              *[sums.get(n, torch.zeros((), device=device)) for n in names]])
        dist.all_reduce(packed)
        dist.all_reduce(confusion)
        correct, total = packed[0].long(), packed[1].long()
        sums = dict(zip(names, packed[2:], strict=True))
    return EvalResult(correct=int(correct), total=int(total),
                      loss_sums={k: float(v) for k, v in sums.items()},
                      confusion=confusion.cpu())


def evaluate_checkpoint(checkpoint: str | Path, shards: str, split: str = "test", *,
                        batch_size: int = 500, device: str = "auto", num_workers: int = 2,
                        out_dir: str | Path | None = None) -> EvalResult:
    """`capsnet eval`: exact metrics of a checkpoint on one split; prints and writes a PNG."""
    from pipeline.data import load_dataset_info, make_loader
    from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint
    from pipeline.train.outputs import save_confusion

    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    info = load_dataset_info(shards)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    loader = make_loader(shards, split, batch_size=batch_size, num_workers=num_workers,
                         training=False, augment=False)
    result = evaluate(model.to(dev), loader, dev, info.num_classes)
    print(format_result(result, f"{Path(checkpoint)} on {shards} [{split}]"))
    if result.confusion is not None and result.total:
        folder = Path(out_dir) if out_dir else Path(checkpoint).resolve().parent
        if folder.suffix == ".pt":
            folder = folder.parent
        folder.mkdir(parents=True, exist_ok=True)
        png = folder / f"confusion-{split}.png"
        save_confusion(result.confusion, png, f"{split}: accuracy {result.accuracy:.4f}")
        print(f"confusion matrix: {png}")
    return result


def format_result(result: EvalResult, title: str) -> str:
    lines = [title,
             f"samples {result.total}  accuracy {result.accuracy:.4f}  "
             f"error {100 * (1 - result.accuracy):.2f}%",
             "losses " + "  ".join(f"{k} {v:.4f}" for k, v in result.mean_losses().items())]
    if result.confusion is not None:
        J = result.confusion.shape[0]
        lines.append("per-class accuracy " + "  ".join(
            f"{j}:{a:.3f}" for j, a in enumerate(result.per_class_accuracy())))
        lines.append("confusion (rows true, columns predicted)")
        lines.append("      " + " ".join(f"{p:>6d}" for p in range(J)))
        for t in range(J):
            lines.append(f"{t:>5d} " + " ".join(f"{int(v):>6d}" for v in result.confusion[t]))
    return "\n".join(lines)
