"""`capsnet`: one thin entry point; each subcommand is registered by one `_add_*` function.

To add a subcommand, write `_add_NAME(subparsers)` that builds its parser and sets
`func=` to a handler `(args) -> int`, then list it in `build_parser`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from pipeline.data.info import DataError
from pipeline.smoke import add_smoke_parser
from pipeline.train.commands import add_eval_parser, add_train_parser, add_tune_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsnet", description="Capsule Networks at cluster scale: data, training, evaluation."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_shards(subparsers)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    add_tune_parser(subparsers)
    add_smoke_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, ValueError, FileNotFoundError) as err:
        if os.environ.get("CAPSNET_DEBUG"):
            raise
        print(
            f"capsnet {args.command}: error: {err}\n(set CAPSNET_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 2


# --- capsnet shards -----------------------------------------------------------------------


def _add_shards(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.data.shards import DATASETS

    p = subparsers.add_parser(
        "shards",
        help="write a dataset as WebDataset tar shards + dataset.json",
        description=(
            "Write DIR/{train,test}-NNNNNN.tar and DIR/dataset.json. Samples are shuffled globally "
            "with --seed before sharding; output is byte-reproducible."
        ),
        epilog=(
            "examples:\n"
            "  capsnet shards --dataset synthetic --out shards/synthetic --train-samples 2000\n"
            "  capsnet shards --dataset idx --data-dir /usr/share/datasets/fashion-mnist --out shards/fmnist\n"
            "  capsnet shards --dataset mnist --data-dir data --download --out shards/mnist\n"
            "  capsnet shards --dataset multimnist --data-dir data/MNIST/raw --out shards/multimnist"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        required=True,
        choices=DATASETS,
        metavar="NAME",
        help=f"one of: {', '.join(DATASETS)}",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--data-dir",
        metavar="D",
        help="raw data: torchvision root (default ./data), or a folder of MNIST-format IDX "
        "files (gz or raw) for idx, multimnist and affine-test",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=10_000,
        metavar="N",
        help="samples per shard (default 10000)",
    )
    p.add_argument("--seed", type=int, default=0, help="shuffle/generator seed (default 0)")
    p.add_argument("--download", action="store_true", help="let torchvision download missing files")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument(
        "--train-samples",
        type=int,
        metavar="N",
        help="synthetic: how many to generate (default 1024); others: keep a random N",
    )
    p.add_argument(
        "--test-samples",
        type=int,
        metavar="N",
        help="synthetic: how many to generate (default 256); others: keep a random N",
    )
    p.add_argument(
        "--image-size", type=int, default=28, help="synthetic: height = width (default 28)"
    )
    p.add_argument("--channels", type=int, default=1, help="synthetic: channels (default 1)")
    p.add_argument("--num-classes", type=int, default=10, help="synthetic: classes (default 10)")
    p.add_argument(
        "--multi-hot", action="store_true", help="synthetic: two overlaid classes per image"
    )
    p.add_argument(
        "--pairs-per-digit",
        type=int,
        default=1,
        metavar="K",
        help="multimnist: pairs generated per source digit (default 1; the paper used 1000)",
    )
    p.add_argument("--name", help="dataset name recorded in dataset.json")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_shards)


def _run_shards(args: argparse.Namespace) -> int:
    from pipeline.data.shards import ShardsConfig, write_shards

    config = ShardsConfig(
        dataset=args.dataset,
        out=args.out,
        data_dir=args.data_dir,
        shard_size=args.shard_size,
        seed=args.seed,
        download=args.download,
        overwrite=args.overwrite,
        train_samples=args.train_samples,
        test_samples=args.test_samples,
        image_size=args.image_size,
        channels=args.channels,
        num_classes=args.num_classes,
        multi_hot=args.multi_hot,
        pairs_per_digit=args.pairs_per_digit,
        name=args.name,
    )
    command = "capsnet " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    info = write_shards(config, progress=not args.no_progress, command=command)
    counts = ", ".join(
        f"{split} {s.num_samples} in {len(s.shards)} shard(s)" for split, s in info.splits.items()
    )
    print(f"wrote {info.name} {tuple(info.image_shape)} to {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
