"""`capsnet eval`: exact accuracy, per-class accuracy and confusion matrix of a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.commands import HelpFormatter
from pipeline.config import ConfigError, absolute_path, is_remote
from pipeline.data import DataConfig, DataError, DatasetInfo, load_dataset_info, make_loader
from pipeline.evaluate import (
    CLI_REMEDY,
    EvalResult,
    IncompatibleDataError,
    IncompleteEvaluationError,
    check_compatible,
    evaluate,
    format_result,
    require_complete,
)
from pipeline.figures import save_confusion
from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="exact accuracy, per-class accuracy and confusion matrix",
        description="Evaluate a checkpoint on every sample of a split exactly once. Writes "
        "eval-<checkpoint>-<split>.json and confusion-<checkpoint>-<split>.png beside the "
        "checkpoint, where <checkpoint> is its folder's name (e.g. checkpoint_epoch-0007). "
        "The shards must match the checkpoint (image shape, classes; a single-label model is "
        "refused on multi-hot shards). A sample that cannot be read is an error unless "
        "--on-error skip --allow-partial, and then the accuracy says over how many of the "
        "split's samples it was computed.",
        epilog="examples:\n  capsnet eval --checkpoint runs/mnist-capsnet --shards shards/mnist"
        "        # the run's best\n  capsnet eval --checkpoint runs/mnist-capsnet/last --shards "
        "shards/mnist\n  capsnet eval --checkpoint runs/mnist-capsnet --shards shards/mnist "
        "--on-error skip --allow-partial   # corrupt shards: the readable samples only",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint.pt, its folder, a run folder (its best), RUN/best or RUN/last",
    )
    p.add_argument("--shards", required=True, help="shard folder (or URL) with dataset.json")
    p.add_argument("--split", default="test", help="split to evaluate")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--loader-workers",
        type=int,
        default=2,
        help="DataLoader worker processes (0: read in this process)",
    )
    p.add_argument("--out", help="folder for the JSON and PNG (none: the checkpoint's folder)")
    p.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="a corrupt shard or sample: stop with an error, or skip and count it",
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="with --on-error skip: report the accuracy over the readable samples when some "
        "could not be read (otherwise that is an error)",
    )
    p.add_argument(
        "--verify-checksums",
        action="store_true",
        help="check every shard of the split against dataset.json's sha256 first",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    evaluate_checkpoint(
        args.checkpoint,
        args.shards,
        args.split,
        batch_size=args.batch_size,
        device=args.device,
        loader_workers=args.loader_workers,
        out_dir=args.out,
        on_error=args.on_error,
        allow_partial=args.allow_partial,
        verify_checksums=args.verify_checksums,
    )
    return 0


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


def checkpoint_file(checkpoint: str | Path) -> Path:
    """The checkpoint.pt itself (see resolve_checkpoint for what may be given)."""
    return resolve_checkpoint(checkpoint).resolve()


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
