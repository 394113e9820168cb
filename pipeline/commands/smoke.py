"""`capsnet smoke` (what `make smoke` runs): shards -> the main training job -> eval -> check.

Picks real data when it is on this machine (MNIST under --data-dir, else Debian's
Fashion-MNIST), otherwise generated data with a note on how to use real data; trains the smoke
config on 1 worker (the GPU if there is one) through the same TorchTrainer as `capsnet train`,
evaluates the best checkpoint exactly and fails unless accuracy is clearly above chance.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from pipeline.commands import HelpFormatter
from pipeline.config import load_config
from pipeline.data import ShardsConfig, load_dataset_info, write_shards
from pipeline.evaluate import evaluate_checkpoint

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MNIST_FILES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "smoke",
        help="end-to-end smoke test: shards, train, eval, accuracy check",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--dataset",
        default="auto",
        help="auto (MNIST in --data-dir, else Debian Fashion-MNIST, else synthetic), "
        "mnist, idx, fashion-mnist, synthetic",
    )
    p.add_argument("--data-dir", default="data", help="torchvision root, or IDX folder for idx")
    p.add_argument("--config", default="configs/smoke.yaml", help="run config to train")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override of the run config (repeatable)",
    )
    p.add_argument("--train-samples", type=int, default=3000, help="training images to shard")
    p.add_argument("--test-samples", type=int, default=1000, help="test images to shard")
    p.add_argument("--out", default="runs", help="storage path for the run")
    p.add_argument("--local", action="store_true", help="train without Ray (same loop)")
    p.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        help="fail below this test accuracy (none: 3x chance, at most 0.5)",
    )
    p.set_defaults(func=run)


def choose_dataset(choice: str, data_dir: str) -> tuple[str, str | None, str]:
    """(dataset, data_dir, why) for `capsnet shards`."""
    mnist_raw = Path(data_dir) / "MNIST" / "raw"
    has_mnist = all(any(mnist_raw.glob(f + "*")) for f in MNIST_FILES)
    if choice == "auto":
        if has_mnist:
            return "mnist", data_dir, f"MNIST found in {mnist_raw}"
        if DEBIAN_FASHION_MNIST.is_dir():
            return (
                "idx",
                str(DEBIAN_FASHION_MNIST),
                "Debian's Fashion-MNIST (dataset-fashion-mnist)",
            )
        return (
            "synthetic",
            None,
            (
                "no real data on this machine, using generated images. For real data: "
                "`capsnet shards --dataset mnist --data-dir data --download` (needs internet), or "
                "`apt-get install dataset-fashion-mnist`, or DATASET=idx DATA_DIR=<IDX folder>"
            ),
        )
    if choice == "fashion-mnist" and not (Path(data_dir) / "FashionMNIST").is_dir():
        return "idx", str(DEBIAN_FASHION_MNIST), "Debian's Fashion-MNIST"
    return choice, (None if choice == "synthetic" else data_dir), f"--dataset {choice}"


def run(args: argparse.Namespace) -> int:
    from pipeline.train.trainer import train

    t0 = time.perf_counter()
    dataset, data_dir, why = choose_dataset(args.dataset, args.data_dir)
    print(f"[smoke] data: {why}", flush=True)
    shards = Path("shards") / f"smoke-{dataset}-{args.train_samples}-{args.test_samples}"
    if not (shards / "dataset.json").is_file():
        write_shards(
            ShardsConfig(
                dataset=dataset,
                out=str(shards),
                data_dir=data_dir,
                train_samples=args.train_samples,
                test_samples=args.test_samples,
                shard_size=1000,
                overwrite=True,
            ),
            progress=True,
        )
    info = load_dataset_info(str(shards))
    name = f"smoke-{dataset}"
    cfg = load_config(
        args.config,
        [
            *args.overrides,
            f"data.shards={shards}",
            f"run.name={name}",
            f"run.storage_path={args.out}",
        ],
    )
    shutil.rmtree(Path(args.out) / name, ignore_errors=True)  # a smoke test always trains anew
    summary = train(cfg, local=args.local)
    if summary.checkpoint is None:
        print(f"[smoke] FAILED: no checkpoint in {summary.run_dir}", file=sys.stderr)
        return 1
    result = evaluate_checkpoint(
        summary.checkpoint, str(shards), "test", batch_size=500, loader_workers=0
    )
    chance = 1.0 / info.num_classes
    floor = args.min_accuracy if args.min_accuracy is not None else min(0.5, 3 * chance)
    print(summary.line())
    print(f"[smoke] {time.perf_counter() - t0:.0f} s wall; outputs: {summary.run_dir}")
    if result.accuracy < floor:
        print(
            f"[smoke] FAILED: test accuracy {result.accuracy:.4f} < {floor:.2f} "
            f"(chance {chance:.2f})",
            file=sys.stderr,
        )
        return 1
    print(f"[smoke] OK: test accuracy {result.accuracy:.4f} >= {floor:.2f} (chance {chance:.2f})")
    return 0
