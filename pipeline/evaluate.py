"""Exact evaluation: every test sample once across all ranks, counts summed with all_reduce.

An accuracy always says over how many of the split's samples it was computed
(`EvalResult.total` of `EvalResult.expected`); `require_complete` turns a partial evaluation
(corrupt shards skipped with on_error=skip) into an error unless the caller allows it, and
`check_compatible` refuses data the checkpoint's model cannot be evaluated on before any is read.

Label kinds. Single-label (`index`) data: a sample is correct when the top score is its class,
and the result has a confusion matrix. Multi-hot data (MultiMNIST): a sample with k classes
present is correct when its k top scores are exactly those classes (the paper's MultiMNIST
metric); there is no confusion matrix. A model trained on multi-hot data may be evaluated on
single-label data (its top class is a well-defined prediction); a model trained on single-label
data is refused on multi-hot data when the caller knows that (`trained_label_kind`).

`evaluate_checkpoint` is `capsnet eval` (and the check at the end of `capsnet smoke`): a
checkpoint read, checked against the shards, evaluated and written out; `checkpoint_file`,
`resolve_device` and `training_label_kind` are what `capsnet report` shares with it.
"""

from __future__ import annotations

import json
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import ConfigError, absolute_path, is_remote
from pipeline.data import DataConfig, DataError, DatasetInfo, load_dataset_info, make_loader
from pipeline.figures import save_confusion
from pipeline.torch_utils import unwrap
from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint

CLI_REMEDY = "--on-error skip --allow-partial"
"""How `capsnet eval` is told to report an accuracy over the readable samples only."""


class IncompleteEvaluationError(DataError):
    """Some of the split's samples could not be read, and a partial accuracy was not allowed."""


class IncompatibleDataError(DataError):
    """The shards do not fit the checkpoint's model (image shape, classes or label kind)."""


@dataclass
class EvalResult:
    correct: int
    total: int
    """Samples evaluated (read and used), summed over ranks."""
    loss_sums: dict[str, float]
    confusion: torch.Tensor | None = field(default=None, repr=False)
    """[J, J] counts, rows = true class, columns = predicted (single-label data only)."""
    samples_skipped: int = 0
    """Samples of the split the loader could not read (summed over ranks)."""
    expected: int = field(kw_only=True)
    """Samples the split holds according to dataset.json: what a complete evaluation reads."""
    label_kind: str = field(default="index", kw_only=True)
    """The data's label kind: `index` (one class per sample) or `multi-hot`."""

    @property
    def complete(self) -> bool:
        """Every sample of the split was evaluated."""
        return self.total == self.expected

    @property
    def unreadable(self) -> int:
        """Samples of the split that were not evaluated."""
        return max(self.expected - self.total, 0)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    def coverage(self) -> str:
        """`9,950 of 10,000 samples (50 unreadable)`: what the accuracy is over."""
        text = f"{self.total:,} of {self.expected:,} samples"
        return text if self.complete else f"{text} ({self.unreadable:,} unreadable)"

    def mean_losses(self) -> dict[str, float]:
        return {k: v / max(self.total, 1) for k, v in self.loss_sums.items()}

    def per_class_accuracy(self) -> list[float]:
        assert self.confusion is not None
        rows = self.confusion.sum(1).clamp_min(1)
        return (self.confusion.diag() / rows).tolist()


def require_complete(
    result: EvalResult, split: str, *, allow_partial: bool = False, remedy: str = CLI_REMEDY
) -> str | None:
    """None when every sample of `split` was evaluated. A partial evaluation raises
    IncompleteEvaluationError (one line: how many were read, how to proceed) unless
    `allow_partial`, in which case the warning to print is returned. An evaluation that read
    no sample at all is always an error: there is no accuracy to report. `remedy` is how the
    caller's user allows a partial result (a CLI flag, a config key)."""
    if result.complete:
        return None
    if result.total == 0:
        raise IncompleteEvaluationError(
            f"split {split!r}: none of its {result.expected:,} samples could be read, so there "
            "is no accuracy to report; fix the shards (rewrite them with `capsnet shards`)"
        )
    if not allow_partial:
        raise IncompleteEvaluationError(
            f"split {split!r}: read {result.total:,} of {result.expected:,} samples "
            f"({result.unreadable:,} unreadable), so an accuracy would not be over the whole "
            f"split; to report it over the readable samples only: {remedy}; or fix the shards "
            "(rewrite them with `capsnet shards`)"
        )
    return (
        f"split {split!r}: accuracy over {result.coverage()} only; "
        "it is not comparable with a complete evaluation"
    )


def _shape(c: int, h: int, w: int) -> str:
    return f"{c}x{h}x{w}"


def check_compatible(
    model_config: Any,
    info: DatasetInfo,
    *,
    shards: str | None = None,
    trained_label_kind: str | None = None,
) -> None:
    """Raise IncompatibleDataError (one line naming both sides) unless a model with
    `model_config` (a CapsNetConfig or BaselineCNNConfig: in_channels, image_size, num_classes)
    can be evaluated on shards described by `info`.

    `trained_label_kind`: the label kind of the data the model was trained on, when known. A
    single-label model on multi-hot shards is refused (a sample would count only when its top
    k scores are exactly its k classes: a number that says little about a model never trained
    to score several classes high). The other way round is allowed: a multi-hot model's top
    class is a well-defined single-label prediction. Unknown: allowed (evaluated as multi-hot).
    """
    where = shards or info.base_url or info.name
    size, channels = model_config.image_size, model_config.in_channels
    wanted = (channels, size, size)
    if tuple(info.image_shape) != wanted or info.num_classes != model_config.num_classes:
        raise IncompatibleDataError(
            f"checkpoint expects {_shape(*wanted)} images and {model_config.num_classes} "
            f"classes; {where} has {_shape(*info.image_shape)} and {info.num_classes}"
        )
    if trained_label_kind == "index" and info.label_kind == "multi-hot":
        raise IncompatibleDataError(
            f"checkpoint was trained on single-label data; {where} has multi-hot labels "
            "(several classes per image), and multi-label evaluation of a single-label model "
            "is not supported: evaluate it on single-label shards"
        )


def correct_predictions(scores_BJ: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] bools. Single-label targets [B]: the top score is the target class. Multi-hot
    targets [B, J] (k_b classes present in sample b): the k_b top scores are exactly them
    (k per sample, so a sample's result never depends on the rest of its batch)."""
    if targets.dim() == 1:
        return scores_BJ.argmax(1) == targets
    present = targets.bool()
    k = present.sum(1, keepdim=True)
    rank = scores_BJ.argsort(1, descending=True).argsort(1)  # 0 = highest score
    return ((rank < k) == present).all(1)


def align_predictions(predicted_BK: torch.Tensor, true_BK: torch.Tensor) -> torch.Tensor:
    """[B, K] the predicted classes reordered so that slot k holds true_BK[:, k] wherever
    that class was predicted; the other predictions fill the remaining slots in order.
    (Both rows hold K distinct classes.)"""
    hit_BK = (true_BK.unsqueeze(2) == predicted_BK.unsqueeze(1)).any(2)  # true k predicted
    used_BK = (predicted_BK.unsqueeze(2) == true_BK.unsqueeze(1)).any(2)  # prediction k true
    # Unused predictions first, in their order (a stable sort puts used ones last) ...
    leftover_BK = predicted_BK.gather(1, torch.sort(used_BK.int(), dim=1, stable=True).indices)
    # ... taken one by one by the slots whose true class was missed.
    take_BK = ((~hit_BK).long().cumsum(1) - 1).clamp(min=0)
    return torch.where(hit_BK, true_BK, leftover_BK.gather(1, take_BK))


def _check_batch(images: torch.Tensor, targets: torch.Tensor, config: Any) -> None:
    """A clear error, before the forward pass, for a batch the model cannot score (rather
    than a convolution shape error, a one_hot error or a bincount/reshape crash)."""
    J = config.num_classes
    size, channels = getattr(config, "image_size", None), getattr(config, "in_channels", None)
    if size is not None and tuple(images.shape[1:]) != (channels, size, size):
        raise IncompatibleDataError(
            f"model expects {_shape(channels, size, size)} images; the loader gave "
            f"{_shape(*images.shape[1:])}"
        )
    if targets.dim() == 1:
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= J):
            bad = targets[(targets < 0) | (targets >= J)]
            raise IncompatibleDataError(
                f"label {int(bad[0])} is outside the model's {J} classes (0..{J - 1})"
            )
    elif targets.dim() != 2 or targets.shape[1] != J:
        raise IncompatibleDataError(
            f"multi-hot labels of shape {tuple(targets.shape)}; the model has {J} classes"
        )


def _part_names(inner: torch.nn.Module, device: torch.device, label_kind: str) -> list[str]:
    """The loss part names of `inner` on this label kind, from one blank sample: a rank that
    read no batch (its shards unreadable, on_error=skip) must pack the same vector as the
    others, or the all_reduce below mismatches."""
    cfg = inner.config
    images = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    if label_kind == "index":
        targets = torch.zeros(1, dtype=torch.long, device=device)
    else:
        targets = torch.zeros(1, cfg.num_classes, device=device)
        targets[0, 0] = 1
    return list(inner.loss(inner(images), images, targets).parts)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
    distributed: bool = False,
) -> EvalResult:
    """Accuracy, summed loss parts and confusion matrix over this rank's share, then summed
    over ranks. The model sees no targets, so CapsNet's decoder is masked by its prediction.

    `loader` is a ShardLoader of the whole split (distributed=False) or of this rank's share
    (distributed=True); `expected` is the split's size from dataset.json either way."""
    # Forward through the plain module: ranks may run one eval batch more or less than each
    # other, and the DDP wrapper's forward can issue collectives.
    inner = unwrap(model)
    num_classes = inner.config.num_classes
    label_kind = loader.info.label_kind
    expected = loader.info.split(loader.split).num_samples
    was_training = inner.training
    inner.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = torch.zeros((), dtype=torch.long, device=device)
    sums: dict[str, torch.Tensor] = {}
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for batch in loader:
        _check_batch(batch.images, batch.labels, inner.config)  # on the host: no device sync
        batch = batch.to(device, non_blocking=True)
        images, targets = batch.images, batch.labels
        with autocast or nullcontext():
            out = inner(images)
            if batch.part_classes is not None and out.reconstructions is not None:
                # Each object reconstructed from a predicted capsule (the K longest), the one
                # of its own class where that was predicted, so the error is per object.
                K = batch.part_classes.shape[1]
                decoded = align_predictions(out.scores.topk(K, dim=1).indices, batch.part_classes)
                out.reconstructions = inner.reconstruct(out.poses, decoded)
            loss = inner.loss(out, images, targets, batch.parts)
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
    if not sums:  # no batch at all: the same part names as every other rank, all zero
        sums = {n: torch.zeros((), device=device) for n in _part_names(inner, device, label_kind)}
    inner.train(was_training)
    names = sorted(sums)
    skipped = torch.tensor(float(loader.stats.samples_skipped), device=device)
    if distributed:
        # One fixed-order vector, one collective; every rank holds the same part names.
        packed = torch.stack([correct.float(), total.float(), skipped, *[sums[n] for n in names]])
        dist.all_reduce(packed)
        dist.all_reduce(confusion)
        correct, total, skipped = packed[0].long(), packed[1].long(), packed[2]
        sums = dict(zip(names, packed[3:], strict=True))
    return EvalResult(
        correct=int(correct),
        total=int(total),
        loss_sums={k: float(v) for k, v in sums.items()},
        confusion=confusion.cpu() if label_kind == "index" else None,
        samples_skipped=int(skipped),
        expected=expected,
        label_kind=label_kind,
    )


def format_result(result: EvalResult, title: str) -> str:
    lines = [
        title,
        f"accuracy {result.accuracy:.4f}  error {100 * (1 - result.accuracy):.2f}%  "
        f"over {result.coverage()}",
    ]
    if result.label_kind == "multi-hot":
        lines.append("multi-label: a sample is correct when its k top scores are its k classes")
    lines.append("losses " + "  ".join(f"{k} {v:.4f}" for k, v in result.mean_losses().items()))
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


# --------------------------------------------------------------------------- a checkpoint


def available_devices() -> list[str]:
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(name: str) -> torch.device:
    """`auto` or a device this machine has; anything else is a ConfigError (exit status 2)
    that lists what is available, not a CUDA traceback from deep inside `model.to`."""
    available = available_devices()
    if name not in available:
        raise ConfigError(f"--device {name}: not available here; available: {', '.join(available)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def checkpoint_file(checkpoint: str | Path, option: str = "--checkpoint") -> Path:
    """The checkpoint.pt itself (see resolve_checkpoint for what may be given). An empty
    `option` value is refused: as a path it would quietly mean the current folder."""
    if not str(checkpoint).strip():
        raise ConfigError(f"{option}: empty; give a checkpoint.pt, its folder, or a run folder")
    return resolve_checkpoint(checkpoint).resolve()


def training_label_kind(ckpt: dict[str, Any]) -> str | None:
    """The label kind of the data a checkpoint was trained on, read from the dataset.json of
    its run config's data.shards when that is a local folder still there; None otherwise."""
    shards = ((ckpt.get("run_config") or {}).get("data") or {}).get("shards")
    if not isinstance(shards, str) or not shards or is_remote(shards):
        return None
    try:
        return load_dataset_info(shards).label_kind
    except (DataError, OSError, ValueError, KeyError, TypeError):
        return None


def evaluate_checkpoint(
    checkpoint: str | Path,
    shards: str,
    split: str = "test",
    *,
    batch_size: int = 500,
    device: str = "auto",
    loader_workers: int = 2,
    out_dir: str | Path | None = None,
    on_error: str = "raise",
    allow_partial: bool = False,
    verify_checksums: bool = False,
) -> EvalResult:
    """Exact metrics of a checkpoint on one split; prints them, writes a JSON and a PNG.

    Raises a DataError subclass (one line) for shards that do not fit the checkpoint, for a
    sample the loader cannot read (on_error="raise"), and for a partial evaluation
    (on_error="skip") unless `allow_partial`; a partial result is then printed with a warning
    and its JSON says how many samples it covers."""
    dev = resolve_device(device)  # before the (slow) checkpoint and data are read
    ckpt = checkpoint_file(checkpoint)
    payload = load_checkpoint(ckpt)
    model = model_from_checkpoint(payload)
    info = load_dataset_info(shards)
    check_compatible(
        model.config, info, shards=shards, trained_label_kind=training_label_kind(payload)
    )
    data = DataConfig(shards=shards, loader_workers=loader_workers, on_error=on_error)
    loader = make_loader(
        data,
        split,
        info=info,
        batch_size=batch_size,
        training=False,
        verify_checksums=verify_checksums,
    )
    try:
        result = evaluate(model.to(dev), loader, dev)
    except (IncompatibleDataError, IncompleteEvaluationError):
        raise
    except DataError as err:  # the loader's, with on_error="raise"
        raise DataError(
            f"{one_line(err)}; to evaluate the readable samples only: {CLI_REMEDY}"
        ) from err
    warning = require_complete(result, split, allow_partial=allow_partial)
    print(format_result(result, f"{ckpt} on {shards} [{split}]"))
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    write_outputs(result, info, ckpt, shards, split, out_dir)
    return result


def one_line(err: BaseException) -> str:
    """The message of a DataError, also when a DataLoader worker process raised it (PyTorch
    re-raises it with the worker's whole traceback as its message)."""
    text = str(err).strip()
    if not text.startswith("Caught "):
        return text
    last = text.splitlines()[-1]
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last.removeprefix(name)


def write_outputs(
    result: EvalResult,
    info: DatasetInfo,
    ckpt: Path,
    shards: str,
    split: str,
    out_dir: str | Path | None,
) -> None:
    """eval-<name>-<split>.json and confusion-<name>-<split>.png, named after the checkpoint's
    folder so that best/, last/ and Ray's checkpoint_* never overwrite each other's."""
    folder = Path(out_dir) if out_dir else ckpt.parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{ckpt.parent.name}-{split}"
    path = folder / f"eval-{stem}.json"
    path.write_text(json.dumps(result_dict(result, info, ckpt, shards, split), indent=2) + "\n")
    print(f"metrics: {path}")
    if info.label_kind == "index" and result.total:
        png = folder / f"confusion-{stem}.png"
        save_confusion(result.confusion, png, f"{stem}: accuracy {result.accuracy:.4f}")
        print(f"confusion matrix: {png}")


def result_dict(
    result: EvalResult, info: DatasetInfo, ckpt: Path, shards: str, split: str
) -> dict[str, Any]:
    """The eval JSON (what `capsnet eval` writes; plain data for a file, not for code)."""
    # Multi-hot data has no single predicted class: no confusion matrix, no per-class accuracy.
    single = info.label_kind == "index" and result.confusion is not None
    return {
        "checkpoint": str(ckpt),
        "shards": absolute_path(shards),
        "split": split,
        "label_kind": info.label_kind,
        "samples": result.total,
        "samples_expected": result.expected,
        "samples_unreadable": result.unreadable,
        "complete": result.complete,
        "samples_skipped": result.samples_skipped,
        "accuracy": result.accuracy,
        "error": 1.0 - result.accuracy,
        "losses": result.mean_losses(),
        "class_names": list(info.class_names),
        "per_class_accuracy": result.per_class_accuracy() if single else None,
        "confusion": result.confusion.tolist() if single else None,
    }
