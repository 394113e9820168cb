"""`capsnet shards`: write a dataset as WebDataset tar shards + dataset.json."""

from __future__ import annotations

import argparse
import shlex
import sys

from pipeline.commands import HelpFormatter
from pipeline.data.shards import DATASETS, ShardsConfig, describe_datasets, write_shards


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shards",
        help="write a dataset as WebDataset tar shards + dataset.json",
        description=(
            "Write DIR/{train,test}-NNNNNN.tar and DIR/dataset.json. Samples are shuffled "
            "globally with --seed before sharding; output is byte-reproducible.\n\n"
            "datasets:\n" + describe_datasets()
        ),
        epilog=(
            "examples:\n"
            "  capsnet shards --dataset synthetic --out shards/synthetic --train-samples 2000\n"
            "  capsnet shards --dataset idx --data-dir /usr/share/datasets/fashion-mnist --out shards/fmnist\n"
            "  capsnet shards --dataset mnist --data-dir data --download --out shards/mnist\n"
            "  capsnet shards --dataset multimnist --data-dir data/MNIST/raw --out shards/multimnist"
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--dataset",
        required=True,
        choices=list(DATASETS),
        metavar="NAME",
        help=f"one of: {', '.join(DATASETS)}",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--data-dir",
        metavar="D",
        help="raw data: torchvision root (none: ./data), or a folder of MNIST-format "
        "IDX files (gz or raw) for idx, multimnist and affine-test",
    )
    p.add_argument("--shard-size", type=int, default=10_000, metavar="N", help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="shuffle/generator seed")
    p.add_argument("--download", action="store_true", help="let torchvision download missing files")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument(
        "--train-samples",
        type=int,
        metavar="N",
        help="synthetic: how many to generate (none: 1024); others: keep a random N",
    )
    p.add_argument(
        "--test-samples",
        type=int,
        metavar="N",
        help="synthetic: how many to generate (none: 256); others: keep a random N",
    )
    p.add_argument("--image-size", type=int, default=28, help="synthetic: height = width")
    p.add_argument("--channels", type=int, default=1, help="synthetic: channels")
    p.add_argument("--num-classes", type=int, default=10, help="synthetic: classes")
    p.add_argument(
        "--multi-hot", action="store_true", help="synthetic: two overlaid classes per image"
    )
    p.add_argument(
        "--pairs-per-digit",
        type=int,
        default=1,
        metavar="K",
        help="multimnist: pairs generated per source digit (the paper used 1000)",
    )
    p.add_argument("--name", help="dataset name recorded in dataset.json (none: the source's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    command = "capsnet " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None
    info = write_shards(config, progress=not args.no_progress, command=command)
    counts = ", ".join(
        f"{split} {s.num_samples} in {len(s.shards)} shard(s)" for split, s in info.splits.items()
    )
    print(f"wrote {info.name} {tuple(info.image_shape)} to {args.out}: {counts}")
    return 0
