"""Loader hand-off rates (issue 13): samples/s (wall) and per CPU-second, finishing every batch
with batch.to("cpu"), for batch 128 and 512 and 0/1/2 worker processes (best of 3 passes).

    .venv/bin/python bench/loader_handoff.py SHARD_DIR
"""

import os
import resource
import sys
import time

import torch

from pipeline.data import open_loader

torch.set_num_threads(int(os.environ.get("THREADS", "1")))


def cpu() -> float:
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def one(shards: str, b: int, w: int) -> tuple[float, float]:
    t, c = time.perf_counter(), cpu()
    n = 0
    for batch in open_loader(shards, "train", batch_size=b, loader_workers=w, augment=True):
        n += len(batch.to("cpu").images)
    return n / (time.perf_counter() - t), n / (cpu() - c)


for b in (128, 512):
    for w in (0, 1, 2):
        rs = [one(sys.argv[1], b, w) for _ in range(3)]
        wall, per_cpu = max(r[0] for r in rs), max(r[1] for r in rs)
        print(
            f"B={b} W={w} wall {wall:,.0f}  per-cpu-s {per_cpu:,.0f}  load {os.getloadavg()[0]:.2f}"
        )
