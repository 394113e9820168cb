"""The (rank, worker, epoch) assignment, checked exhaustively without processes."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from pipeline.data.partition import PartitionError, RankPlan, plan_epoch, shard_order

SHARD_LAYOUTS = [
    [10],
    [7, 7, 7],
    [100, 100, 100, 100, 37],
    [5, 0, 9, 1, 13, 2, 8],  # ragged, with an empty shard
    [3] * 11,  # many small shards
    [64, 64],
]
WORLD_SIZES = [1, 2, 3, 4, 8]
WORKERS = [0, 1, 2, 3]
BATCH_SIZES = [1, 4, 7]
EPOCHS = [0, 1, 2]


def _samples(plan: RankPlan) -> list[tuple[int, int]]:
    """Every (shard, index-in-shard) the rank reads, in reading order per worker."""
    return [(s.shard, i) for w in plan.workers for s in w.slices for i in range(s.start, s.stop)]


def _plans(sizes, world, workers, batch, epoch, training):
    try:
        return plan_epoch(
            sizes,
            batch_size=batch,
            world_size=world,
            num_workers=workers,
            epoch=epoch,
            seed=11,
            training=training,
        )
    except PartitionError:
        return None


@pytest.mark.parametrize("sizes", SHARD_LAYOUTS)
@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("workers", WORKERS)
def test_training_equal_full_batches_no_duplicates(sizes, world, workers):
    total = sum(sizes)
    for batch, epoch in itertools.product(BATCH_SIZES, EPOCHS):
        plans = _plans(sizes, world, workers, batch, epoch, training=True)
        expected_batches = total // world // batch
        if expected_batches == 0:
            assert plans is None, "a rank without a full batch must be rejected"
            continue
        assert {p.num_batches for p in plans} == {expected_batches}
        seen = Counter()
        for plan in plans:
            assert len(plan.workers) == max(workers, 1)
            assert sum(w.num_batches for w in plan.workers) == plan.num_batches
            for w in plan.workers:
                assert w.num_samples == w.num_batches * batch  # only full batches in training
                assert sum(s.stop - s.start for s in w.slices) == w.num_samples
                for s in w.slices:
                    assert 0 <= s.start < s.stop <= sizes[s.shard]
            seen.update(_samples(plan))
        assert max(seen.values()) == 1, "a sample was assigned twice in one epoch"
        # Only the remainder that cannot fill a batch on every rank is dropped.
        assert total - sum(seen.values()) < world * batch + world


@pytest.mark.parametrize("sizes", SHARD_LAYOUTS)
@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("workers", WORKERS)
def test_eval_reads_every_sample_exactly_once(sizes, world, workers):
    every = Counter((shard, i) for shard, n in enumerate(sizes) for i in range(n))
    for batch in BATCH_SIZES:
        plans = _plans(sizes, world, workers, batch, 0, training=False)
        if sum(sizes) < world:
            assert plans is None
            continue
        seen = Counter()
        for plan in plans:
            assert plan.num_samples >= 1
            partial = [w for w in plan.workers if w.num_samples != w.num_batches * batch]
            assert len(partial) <= 1, "at most the rank's last batch may be partial"
            assert plan.num_batches == -(-plan.num_samples // batch)
            seen.update(_samples(plan))
        assert seen == every
        # Ranks differ by at most one sample.
        assert max(p.num_samples for p in plans) - min(p.num_samples for p in plans) <= 1


def test_eval_keeps_stored_order():
    plans = plan_epoch([3, 4, 5], batch_size=2, world_size=1, epoch=5, seed=1, training=False)
    assert _samples(plans[0]) == [(s, i) for s, n in enumerate([3, 4, 5]) for i in range(n)]


def test_training_order_depends_on_seed_and_epoch_only():
    sizes = [10] * 9
    kw = dict(batch_size=3, world_size=2, num_workers=2)
    a = plan_epoch(sizes, epoch=1, seed=4, **kw)
    assert a == plan_epoch(sizes, epoch=1, seed=4, **kw)
    assert a != plan_epoch(sizes, epoch=2, seed=4, **kw)
    assert a != plan_epoch(sizes, epoch=1, seed=5, **kw)
    orders = {tuple(shard_order(9, epoch=e, seed=0, training=True)) for e in range(10)}
    assert len(orders) > 5
    assert shard_order(9, epoch=3, seed=0, training=False) == list(range(9))


def test_dropped_remainder_moves_between_epochs():
    # One shard: only the random offset can change which samples are dropped.
    dropped = set()
    for epoch in range(20):
        (plan,) = plan_epoch([10], batch_size=4, epoch=epoch, training=True)
        kept = set(_samples(plan))
        dropped |= {(0, i) for i in range(10)} - kept
    assert len(dropped) > 2


def test_more_readers_than_shards_share_shards():
    plans = plan_epoch([40], batch_size=2, world_size=4, num_workers=3, training=True)
    readers = [w for p in plans for w in p.workers]
    assert len(readers) == 12 and all(w.num_batches >= 1 for w in readers)
    assert all(s.shard == 0 for w in readers for s in w.slices)


@pytest.mark.parametrize(
    "kwargs",
    [dict(batch_size=0), dict(batch_size=1, world_size=0), dict(batch_size=1, num_workers=-1)],
)
def test_bad_arguments(kwargs):
    with pytest.raises(PartitionError):
        plan_epoch([4], **kwargs)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(PartitionError, match="one full batch"):
        plan_epoch([5, 2], batch_size=4, world_size=2, training=True)
    with pytest.raises(PartitionError, match="at least one sample"):
        plan_epoch([1, 1], batch_size=4, world_size=3, training=False)
