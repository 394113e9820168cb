"""Loader throughput: samples/s per DataLoader worker and with 2 workers, vs an in-memory baseline.

    .venv/bin/python bench/bench_loader.py                 # synthetic 60k 28×28 shards in a temp dir
    .venv/bin/python bench/bench_loader.py --shards DIR    # existing shards (e.g. Fashion-MNIST)

Each row is the best of --repeats full passes over the train split (training mode) with a
warm page cache, so it measures the loader's CPU cost, not the disk. Every batch is finished
with `batch.to("cpu")` (the ±2 px shift and float conversion that Batch.to runs on the
training device), so rows with and without worker processes do the same work. Wall-clock
rates suffer when other processes share the cores, so CPU time (this process plus its reaped
DataLoader workers) is reported too: samples per CPU-second is the per-core figure. torch
runs one intra-op thread here (a loader core's view; two threads on two busy cores only spin).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.data import ShardsConfig, load_dataset_info, open_loader, write_shards
from pipeline.data.augment import random_shift
from pipeline.data.tario import iter_samples


def cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(fn: Callable[..., int], *args: object) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second) of one call that returns a count."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    n = fn(*args)
    return n / (time.perf_counter() - wall), n / max(cpu_seconds() - cpu, 1e-9)


def in_memory_pass(images_u8: np.ndarray, labels: np.ndarray, batch: int, augment: bool) -> int:
    """Shuffle, batch, shift and scale a uint8 array already in RAM: the floor to beat."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images_u8))
    n = 0
    for i in range(0, len(order) - batch + 1, batch):
        idx = order[i : i + batch]
        x = images_u8[idx]
        if augment:
            x = random_shift(x, 2, rng)
        _ = torch.from_numpy(x).to(torch.float32).div_(255.0), torch.from_numpy(labels[idx])
        n += len(idx)
    return n


def loader_pass(shards: str, batch: int, workers: int, augment: bool) -> int:
    loader = open_loader(shards, "train", batch_size=batch, loader_workers=workers, augment=augment)
    n = sum(len(b.to("cpu")) for b in loader)
    loader.close()
    return n


def load_split(shards: str) -> tuple[np.ndarray, np.ndarray]:
    info = load_dataset_info(shards)
    images, labels = [], []
    for url in info.shard_urls("train"):
        with open(url, "rb") as f:
            for _, fields in iter_samples(f):
                images.append(fields["img.u8"])
                labels.append(int(fields["cls"]))
    pixels = np.frombuffer(b"".join(images), np.uint8).reshape(len(images), *info.image_shape)
    return pixels, np.array(labels)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shards", help="shard directory (default: synthetic shards in a temp dir)"
    )
    parser.add_argument("--samples", type=int, default=60_000, help="synthetic train samples")
    parser.add_argument("--batch-sizes", default="128,512")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            shards = os.path.join(tmp, "shards")
            config = ShardsConfig(
                dataset="synthetic", out=shards, train_samples=args.samples, test_samples=16
            )
            write_shards(config)
        info = load_dataset_info(shards)
        images, labels = load_split(shards)
        rows: list[tuple[str, int, int, bool, Callable[..., int], tuple]] = []
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for aug in (False, True):
                args_ = (images, labels, batch, aug)
                rows.append(
                    ("in-memory uint8 array (baseline)", batch, 0, aug, in_memory_pass, args_)
                )
            for workers in (0, 1, 2):
                for aug in (False, True):
                    args_ = (shards, batch, workers, aug)
                    rows.append(
                        (
                            f"make_loader num_workers={workers}",
                            batch,
                            workers,
                            aug,
                            loader_pass,
                            args_,
                        )
                    )
        train = info.split("train")
        print(
            f"# {info.name} {info.image_shape}: train {train.num_samples} samples in {len(train.shards)} shards"
        )
        print(
            f"# {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, torch {torch.__version__}, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
        )
        print(f"# load average before: {os.getloadavg()[0]:.2f}")
        print(
            "| pipeline | batch | augment | samples/s (wall) | per worker (wall) | samples per CPU-second |"
        )
        print("|---|---:|---|---:|---:|---:|")
        for name, batch, workers, aug, fn, fn_args in rows:
            results = [timed(fn, *fn_args) for _ in range(args.repeats)]
            wall, cpu = max(r[0] for r in results), max(r[1] for r in results)
            shift = "±2 px" if aug else "off"
            print(
                f"| {name} | {batch} | {shift} | {wall:,.0f} | {wall / max(workers, 1):,.0f} | {cpu:,.0f} |",
                flush=True,
            )
        print(f"# load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
