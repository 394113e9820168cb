"""`capsnet eval`: exact accuracy, per-class accuracy and confusion matrix of a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline.commands import HelpFormatter
from pipeline.data import DataConfig, load_dataset_info, make_loader
from pipeline.evaluate import EvalResult, evaluate, format_result
from pipeline.figures import save_confusion
from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="exact accuracy, per-class accuracy and confusion matrix",
        description="Evaluate a checkpoint on every sample of a split exactly once.",
        epilog="example:\n  capsnet eval --checkpoint runs/mnist-capsnet/checkpoints/"
        "best --shards shards/mnist",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt or the folder holding it")
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
    p.add_argument("--out", help="folder for confusion-<split>.png (none: the checkpoint's)")
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
    )
    return 0


def evaluate_checkpoint(
    checkpoint: str | Path,
    shards: str,
    split: str = "test",
    *,
    batch_size: int = 500,
    device: str = "auto",
    loader_workers: int = 2,
    out_dir: str | Path | None = None,
) -> EvalResult:
    """Exact metrics of a checkpoint on one split; prints them and writes a PNG."""
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    info = load_dataset_info(shards)
    dev = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    )
    data = DataConfig(shards=shards, loader_workers=loader_workers)
    loader = make_loader(data, split, info=info, batch_size=batch_size, training=False)
    result = evaluate(model.to(dev), loader, dev)
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
