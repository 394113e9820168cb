"""`capsnet eval`: exact accuracy, per-class accuracy and confusion matrix of a checkpoint."""

from __future__ import annotations

import argparse

from pipeline.commands import HelpFormatter
from pipeline.evaluate import evaluate_checkpoint


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
