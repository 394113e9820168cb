"""The paper's only augmentation: shift each image by up to ±2 px, padding with zeros."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=8)
def _window_offsets(channels: int, height: int, width: int, pad: int) -> np.ndarray:
    """Flat offsets of an unshifted H×W window inside one padded (C, H+2p, W+2p) image."""
    padded_h, padded_w = height + 2 * pad, width + 2 * pad
    c = np.arange(channels)[:, None, None] * padded_h * padded_w
    y = np.arange(height)[None, :, None] * padded_w
    x = np.arange(width)[None, None, :]
    return (c + y + x).ravel()


def random_offsets(
    n: int, max_shift: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx), each [n], drawn uniformly from [-max_shift, max_shift]."""
    dy = rng.integers(-max_shift, max_shift + 1, size=n)
    dx = rng.integers(-max_shift, max_shift + 1, size=n)
    return dy, dx


def random_shift(images_BCHW: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Shift every image by its own (dy, dx) drawn from [-max_shift, max_shift]²."""
    if max_shift == 0:
        return images_BCHW
    dy, dx = random_offsets(len(images_BCHW), max_shift, rng)
    return shift_images(images_BCHW, dy, dx, max_shift)


def shift_images(
    images_BCHW: np.ndarray, dy_B: np.ndarray, dx_B: np.ndarray, max_shift: int
) -> np.ndarray:
    """Move image b down by dy[b] and right by dx[b] (|d| <= max_shift), zeros shifted in.

    One gather over a zero-padded copy: ~2 µs per 28×28 image, against ~6 µs for a
    Python loop of per-image slice copies.
    """
    B, C, H, W = images_BCHW.shape
    p = max_shift
    assert np.all(np.abs(dy_B) <= p) and np.all(np.abs(dx_B) <= p), "shift beyond max_shift"
    padded = np.zeros((B, C, H + 2 * p, W + 2 * p), dtype=images_BCHW.dtype)
    padded[:, :, p : p + H, p : p + W] = images_BCHW
    # Output pixel (y, x) comes from padded (y + p - dy, x + p - dx).
    origin_B = np.arange(B) * padded[0].size + (p - dy_B) * (W + 2 * p) + (p - dx_B)
    gathered = padded.ravel()[origin_B[:, None] + _window_offsets(C, H, W, p)[None, :]]
    return gathered.reshape(B, C, H, W)


def shift_tensor(
    images_BCHW: torch.Tensor, shifts_B2: torch.Tensor, max_shift: int
) -> torch.Tensor:
    """`shift_images` as one batched torch op on the tensors' device (any dtype, no host
    sync): image b moves down by shifts[b, 0] and right by shifts[b, 1], zeros shifted in."""
    B, C, H, W = images_BCHW.shape
    p = max_shift
    padded = torch.nn.functional.pad(images_BCHW, (p, p, p, p))  # [B, C, H+2p, W+2p]
    dy_B, dx_B = shifts_B2.unbind(1)
    # Output pixel (y, x) comes from padded (y + p - dy, x + p - dx), as in shift_images.
    rows_BH = torch.arange(H, device=images_BCHW.device) + (p - dy_B)[:, None]
    cols_BW = torch.arange(W, device=images_BCHW.device) + (p - dx_B)[:, None]
    index_BN = (rows_BH[:, :, None] * (W + 2 * p) + cols_BW[:, None, :]).view(B, 1, H * W)
    gathered = padded.flatten(2).gather(2, index_BN.expand(B, C, H * W))
    return gathered.view(B, C, H, W)
