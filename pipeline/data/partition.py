"""Which samples each (rank, worker) reads in an epoch: a pure function of sizes and seeds.

The epoch's shards are laid end to end as one sample stream. Training shuffles the shard
order by (seed, epoch), then gives every rank the same number of *full* batches as one
contiguous range; the few samples that do not fill a batch on every rank are dropped, at a
random offset so that the dropped ones change from epoch to epoch. Evaluation keeps the
stored order and cuts the stream into near-equal contiguous rank ranges that together hold
every sample exactly once. Inside a rank, batches (not samples) are dealt to DataLoader
workers as contiguous runs, so every worker batch is full except, in evaluation, the last
batch of the rank. Ranges map back onto (shard, start, stop) slices, which is how more
ranks × workers than shards still works: several readers share a shard.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate


class PartitionError(ValueError):
    """The split cannot feed the requested ranks (e.g. fewer samples than ranks × batch)."""


@dataclass(frozen=True)
class ShardSlice:
    """Samples [start, stop) of shard number `shard` (an index into the split's shard list)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class WorkerPlan:
    """What one DataLoader worker of one rank reads and yields in one epoch."""

    slices: tuple[ShardSlice, ...]
    num_samples: int
    num_batches: int


@dataclass(frozen=True)
class RankPlan:
    workers: tuple[WorkerPlan, ...]
    num_samples: int
    num_batches: int


def shard_order(num_shards: int, *, epoch: int, seed: int, training: bool) -> list[int]:
    """Training: a permutation seeded by (seed, epoch); evaluation: the stored order."""
    order = list(range(num_shards))
    if training:
        # String seeds hash with SHA-512: stable across Python versions and platforms.
        random.Random(f"shard-order:{seed}:{epoch}").shuffle(order)
    return order


def plan_epoch(
    shard_sizes: Sequence[int],
    *,
    batch_size: int,
    world_size: int = 1,
    num_workers: int = 0,
    epoch: int = 0,
    seed: int = 0,
    training: bool = True,
) -> tuple[RankPlan, ...]:
    """The reading plan of every rank (index = rank); `num_workers=0` means one reader."""
    _validate(shard_sizes, batch_size, world_size, num_workers)
    order = shard_order(len(shard_sizes), epoch=epoch, seed=seed, training=training)
    sizes = [shard_sizes[i] for i in order]
    total = sum(sizes)
    if training:
        rank_ranges = _train_rank_ranges(total, batch_size, world_size, epoch, seed)
    else:
        rank_ranges = _eval_rank_ranges(total, world_size)
    ends = list(accumulate(sizes))
    readers = max(num_workers, 1)
    return tuple(
        _rank_plan(start, stop, batch_size, readers, order, sizes, ends)
        for start, stop in rank_ranges
    )


def _validate(
    shard_sizes: Sequence[int], batch_size: int, world_size: int, num_workers: int
) -> None:
    if batch_size < 1:
        raise PartitionError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1:
        raise PartitionError(f"world_size must be >= 1, got {world_size}")
    if num_workers < 0:
        raise PartitionError(f"num_workers must be >= 0, got {num_workers}")
    if any(size < 0 for size in shard_sizes):
        raise PartitionError(f"shard sizes must be >= 0, got {list(shard_sizes)}")


def _train_rank_ranges(
    total: int, batch_size: int, world_size: int, epoch: int, seed: int
) -> list[tuple[int, int]]:
    batches = total // world_size // batch_size
    if batches == 0:
        raise PartitionError(
            f"{total} samples cannot give each of {world_size} ranks one full batch of "
            f"{batch_size}; use a smaller batch size, fewer ranks, or more data"
        )
    per_rank = batches * batch_size
    slack = total - per_rank * world_size
    offset = random.Random(f"offset:{seed}:{epoch}").randint(0, slack)
    return [(offset + r * per_rank, offset + (r + 1) * per_rank) for r in range(world_size)]


def _eval_rank_ranges(total: int, world_size: int) -> list[tuple[int, int]]:
    if total < world_size:
        raise PartitionError(
            f"{total} samples cannot give each of {world_size} ranks at least one sample; "
            "evaluate on fewer ranks"
        )
    bounds = [total * r // world_size for r in range(world_size + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _rank_plan(
    start: int,
    stop: int,
    batch_size: int,
    readers: int,
    order: list[int],
    sizes: list[int],
    ends: list[int],
) -> RankPlan:
    num_batches = -(-(stop - start) // batch_size)  # ceil: a partial last batch only in eval
    workers = []
    batch = 0
    for worker in range(readers):
        worker_batches = num_batches // readers + (worker < num_batches % readers)
        lo = min(start + batch * batch_size, stop)
        hi = min(start + (batch + worker_batches) * batch_size, stop)
        batch += worker_batches
        slices = _to_slices(lo, hi, order, sizes, ends)
        workers.append(WorkerPlan(slices=slices, num_samples=hi - lo, num_batches=worker_batches))
    return RankPlan(workers=tuple(workers), num_samples=stop - start, num_batches=num_batches)


def _to_slices(
    lo: int, hi: int, order: list[int], sizes: list[int], ends: list[int]
) -> tuple[ShardSlice, ...]:
    """Stream range [lo, hi) → per-shard slices, in stream order."""
    slices = []
    position = bisect.bisect_right(ends, lo)  # first shard whose end is past lo
    while lo < hi:
        shard_start = ends[position] - sizes[position]
        take_stop = min(hi, ends[position])
        if take_stop > lo:
            slices.append(ShardSlice(order[position], lo - shard_start, take_stop - shard_start))
        lo = take_stop
        position += 1
    return tuple(slices)
