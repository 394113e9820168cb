"""Batch hand-off: the loader ships uint8 pixels and pending shifts; `.to(device)` finishes
them (shift, then float32 in [0, 1]) exactly as the numpy shift would, parts moved alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import Batch, open_loader
from pipeline.data.augment import random_offsets, shift_images


def _raw_batch(n=6, k=2, size=8, p=2, seed=0) -> tuple[Batch, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 1, size, size), dtype=np.uint8)
    parts = rng.integers(0, 256, size=(n, k, 1, size, size), dtype=np.uint8)
    dy, dx = random_offsets(n, p, rng)
    batch = Batch(
        torch.from_numpy(images),
        torch.arange(n),
        torch.from_numpy(parts),
        torch.zeros(n, k, dtype=torch.int64),
        shifts=torch.from_numpy(np.stack([dy, dx], axis=1)),
        max_shift=p,
    )
    return batch, dy, dx


def test_to_shifts_and_scales_images_and_parts_with_the_same_offsets():
    raw, dy, dx = _raw_batch()
    done = raw.to("cpu")
    assert done.ready and done.shifts is None
    assert done.images.dtype == done.parts.dtype == torch.float32
    images = shift_images(raw.images.numpy(), dy, dx, 2)
    np.testing.assert_array_equal(done.images.numpy(), images.astype(np.float32) / 255)
    for k in range(raw.parts.shape[1]):
        part = shift_images(raw.parts[:, k].numpy(), dy, dx, 2)
        np.testing.assert_array_equal(done.parts[:, k].numpy(), part.astype(np.float32) / 255)
    assert torch.equal(done.labels, raw.labels) and torch.equal(done.part_classes, raw.part_classes)


def test_finished_batch_is_left_as_it_is():
    done = _raw_batch()[0].to("cpu")
    again = done.to("cpu")
    assert again.images is done.images and again.parts is done.parts
    float_batch = Batch(torch.rand(3, 1, 4, 4), torch.arange(3))  # built by hand: as given
    assert torch.equal(float_batch.to("cpu").images, float_batch.images)


def test_split_gives_consecutive_views():
    raw = _raw_batch(n=7)[0]
    pieces = raw.split(3)
    assert [len(p) for p in pieces] == [3, 3, 1]
    assert torch.equal(torch.cat([p.to("cpu").images for p in pieces]), raw.to("cpu").images)
    assert raw.split(7) == [raw]


def _shifts(loader) -> list[tuple]:
    return [(b.labels.tolist(), b.shifts.tolist(), b.images.sum().item()) for b in loader]


@pytest.mark.parametrize("handoff", [8, 40, 10_000])
def test_worker_hand_off_units_do_not_change_the_batches(synthetic_dir, handoff):
    """One worker process handing over several batches at once yields exactly what the
    in-process loader yields: same batches, same offsets (drawn per batch)."""
    kw = dict(batch_size=8, epoch=3, seed=5)
    here = _shifts(open_loader(synthetic_dir, "train", **kw))
    there = open_loader(synthetic_dir, "train", loader_workers=1, handoff_samples=handoff, **kw)
    assert _shifts(there) == here
    assert there.stats.batches == len(here) == len(there)


def test_persistent_workers_follow_set_epoch_and_ignore_abandoned_passes(synthetic_dir):
    kw = dict(batch_size=10, seed=1, loader_workers=2, handoff_samples=20)
    loader = open_loader(synthetic_dir, "train", **kw)
    first = _shifts(loader)
    for epoch in (1, 0):
        loader.set_epoch(epoch)
        for i, _ in enumerate(loader):  # abandoned early, like train.max_steps_per_epoch
            if i == 2:
                break
        assert _shifts(loader) == _shifts(open_loader(synthetic_dir, "train", epoch=epoch, **kw))
        assert loader.stats.batches == len(loader)  # nothing of the abandoned pass counted
    loader.set_epoch(0)
    assert _shifts(loader) == first
    loader.close()


def test_eval_batches_are_unshifted_uint8(synthetic_dir):
    loader = open_loader(synthetic_dir, "test", batch_size=64, training=False, loader_workers=2)
    batches = list(loader)
    assert all(b.shifts is None and b.images.dtype == torch.uint8 for b in batches)
    assert sum(len(b) for b in batches) == 250 and len(batches) == len(loader)
