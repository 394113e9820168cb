"""The ±2 px shift: vectorised gather equals a plain per-image loop; the batched torch shift
(run by Batch.to on the training device) equals the numpy one exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.augment import random_offsets, random_shift, shift_images, shift_tensor


def _shift_reference(image_CHW: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(image_CHW)
    _, h, w = image_CHW.shape
    for y in range(h):
        for x in range(w):
            if 0 <= y - dy < h and 0 <= x - dx < w:
                out[:, y, x] = image_CHW[:, y - dy, x - dx]
    return out


@pytest.mark.parametrize("shape", [(5, 1, 7, 9), (3, 3, 6, 6)])
@pytest.mark.parametrize("max_shift", [1, 2, 4])
def test_shift_matches_loop_reference(shape, max_shift):
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=shape, dtype=np.uint8)
    dy = rng.integers(-max_shift, max_shift + 1, size=shape[0])
    dx = rng.integers(-max_shift, max_shift + 1, size=shape[0])
    shifted = shift_images(images, dy, dx, max_shift)
    for b in range(shape[0]):
        np.testing.assert_array_equal(
            shifted[b], _shift_reference(images[b], int(dy[b]), int(dx[b]))
        )


def test_random_shift_is_seeded_and_bounded():
    images = np.full((64, 1, 8, 8), 255, dtype=np.uint8)
    a = random_shift(images, 2, np.random.default_rng(1))
    np.testing.assert_array_equal(a, random_shift(images, 2, np.random.default_rng(1)))
    # A full image loses at most 2 rows and 2 columns to zeros.
    lit = (a > 0).sum(axis=(1, 2, 3))
    assert lit.min() >= 6 * 6 and (lit < 64).any()
    assert random_shift(images, 0, np.random.default_rng(1)) is images


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 1, 7, 9), (4, 3, 6, 6), (1, 2, 28, 28)])
@pytest.mark.parametrize("max_shift", [1, 2, 4])
def test_device_shift_equals_numpy_shift_exactly(shape, max_shift, dtype):
    rng = np.random.default_rng(sum(shape) + max_shift)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    dy, dx = random_offsets(shape[0], max_shift, rng)
    expected = shift_images(images, dy, dx, max_shift)
    shifts = torch.from_numpy(np.stack([dy, dx], axis=1))
    got = shift_tensor(torch.from_numpy(images).to(dtype), shifts, max_shift)
    assert got.dtype == dtype and got.shape == shape
    np.testing.assert_array_equal(got.to(torch.uint8).numpy(), expected)


def test_device_shift_covers_every_offset_at_the_bound():
    images = np.arange(1, 1 + 2 * 5 * 5, dtype=np.uint8).reshape(2, 1, 5, 5)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            d = (np.array([dy, -dy]), np.array([dx, -dx]))
            shifts = torch.tensor([[dy, dx], [-dy, -dx]])
            got = shift_tensor(torch.from_numpy(images), shifts, 2).numpy()
            np.testing.assert_array_equal(got, shift_images(images, *d, 2))
