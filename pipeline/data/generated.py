"""Datasets generated from an MNIST-format source, as in the paper: MultiMNIST and affNIST-style.

Every random choice is drawn up front per split from `default_rng([seed, split])`, so
`take(indices)` is a pure lookup and any subset renders identically, in any chunking.
"""

from __future__ import annotations

import json

import numpy as np

from pipeline.data.augment import shift_images
from pipeline.data.info import IMAGE_FIELD, DataError
from pipeline.data.sources import Fields, Source, SplitSource

MULTI_SIZE, MULTI_SHIFT = 36, 4  # 28 px digits, each shifted up to ±4 px on a 36×36 canvas
AFFINE_SIZE = 40
AFFINE_TRAIN_SHIFT = 6  # 28 → 40 leaves 6 px each side: "placed randomly" on the canvas
AFFINE_RANGES = {  # affNIST's transform ranges, plus a translation that keeps digits in frame
    "rotation_deg": (-20.0, 20.0),
    "shear": (-0.2, 0.2),
    "scale_y": (0.8, 1.2),
    "scale_x": (0.8, 1.2),
    "ty": (-4.0, 4.0),
    "tx": (-4.0, 4.0),
}


def _digits(base: Source, split: str) -> tuple[np.ndarray, np.ndarray]:
    part = base.splits[split]
    fields = part.take(np.arange(part.num_samples))
    images, labels = fields[IMAGE_FIELD], fields["cls"]
    if images.shape[1:] != (1, 28, 28):
        raise DataError(
            f"{base.name}: expected 1×28×28 MNIST-format digits, got {images.shape[1:]}"
        )
    return images, labels


def _pad(images_N1HW: np.ndarray, size: int) -> np.ndarray:
    pad = (size - images_N1HW.shape[-1]) // 2
    return np.pad(images_N1HW, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


# --- MultiMNIST ---------------------------------------------------------------------------


def multimnist_source(base: Source, *, pairs_per_digit: int = 1, seed: int = 0) -> Source:
    """Each digit, shifted ≤ 4 px on 36×36, overlaid on a shifted digit of another class.

    Multi-hot labels are `base.num_classes` wide in every split, also in a split that
    lacks the highest classes.
    """
    if pairs_per_digit < 1:
        raise DataError(f"pairs_per_digit must be >= 1, got {pairs_per_digit}")
    splits = {
        split: _multimnist_split(
            *_digits(base, split),
            base.num_classes,
            pairs_per_digit,
            np.random.default_rng([seed, i]),
        )
        for i, split in enumerate(("train", "test"))
    }
    return Source(
        name=f"multimnist:{base.name}",
        image_shape=(1, MULTI_SIZE, MULTI_SIZE),
        num_classes=base.num_classes,
        label_kind="multi-hot",
        splits=splits,
        class_names=base.class_names,
        extra_fields=("rec0.u8", "rec1.u8", "json"),
        params={"base": base.name, "pairs_per_digit": pairs_per_digit, "max_shift": MULTI_SHIFT},
    )


def _multimnist_split(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    pairs: int,
    rng: np.random.Generator,
) -> SplitSource:
    n = len(images)
    if len(np.unique(labels)) < 2:
        raise DataError("MultiMNIST needs digits of at least two classes")
    first = np.repeat(np.arange(n), pairs)
    second = rng.integers(0, n, size=len(first))
    # Redraw partners of the same class until none is left (a few rounds).
    while (same := labels[second] == labels[first]).any():
        second[same] = rng.integers(0, n, size=int(same.sum()))
    shifts = rng.integers(-MULTI_SHIFT, MULTI_SHIFT + 1, size=(len(first), 4))
    canvas = _pad(images, MULTI_SIZE)

    def take(idx: np.ndarray) -> Fields:
        a, b, s = first[idx], second[idx], shifts[idx]
        rec0 = shift_images(canvas[a], s[:, 0], s[:, 1], MULTI_SHIFT)
        rec1 = shift_images(canvas[b], s[:, 2], s[:, 3], MULTI_SHIFT)
        merged = np.minimum(rec0.astype(np.uint16) + rec1, 255).astype(np.uint8)
        hot = np.zeros((len(idx), num_classes), dtype=np.uint8)
        hot[np.arange(len(idx)), labels[a]] = 1
        hot[np.arange(len(idx)), labels[b]] = 1
        meta = [
            json.dumps(
                {
                    "classes": [int(labels[i]), int(labels[j])],
                    "source_index": [int(i), int(j)],
                    "shifts": [[int(v) for v in row[:2]], [int(v) for v in row[2:]]],
                }
            )
            for i, j, row in zip(a, b, s, strict=True)
        ]
        return {IMAGE_FIELD: merged, "hot.u8": hot, "rec0.u8": rec0, "rec1.u8": rec1, "json": meta}

    return SplitSource(len(first), take)


# --- affNIST-style ------------------------------------------------------------------------


def affine_source(base: Source, *, seed: int = 0) -> Source:
    """train: digits placed at random on 40×40; test: centred on 40×40, then random affine."""
    train_images, train_labels = _digits(base, "train")
    test_images, test_labels = _digits(base, "test")
    splits = {
        "train": _translated_split(train_images, train_labels, np.random.default_rng([seed, 0])),
        "test": _affine_split(test_images, test_labels, np.random.default_rng([seed, 1])),
    }
    return Source(
        name=f"affine-test:{base.name}",
        image_shape=(1, AFFINE_SIZE, AFFINE_SIZE),
        num_classes=base.num_classes,
        label_kind="index",
        splits=splits,
        class_names=base.class_names,
        extra_fields=("json",),
        params={
            "base": base.name,
            "train_max_shift": AFFINE_TRAIN_SHIFT,
            "test_ranges": {k: list(v) for k, v in AFFINE_RANGES.items()},
        },
    )


def _translated_split(
    images: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> SplitSource:
    shifts = rng.integers(-AFFINE_TRAIN_SHIFT, AFFINE_TRAIN_SHIFT + 1, size=(len(images), 2))
    canvas = _pad(images, AFFINE_SIZE)

    def take(idx: np.ndarray) -> Fields:
        s = shifts[idx]
        moved = shift_images(canvas[idx], s[:, 0], s[:, 1], AFFINE_TRAIN_SHIFT)
        meta = [json.dumps({"ty": int(dy), "tx": int(dx)}) for dy, dx in s]
        return {IMAGE_FIELD: moved, "cls": labels[idx], "json": meta}

    return SplitSource(len(images), take)


def _affine_split(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> SplitSource:
    # Rounded so the stored JSON is exactly the parameters the image was rendered with.
    params = {
        k: np.round(rng.uniform(lo, hi, size=len(images)), 4)
        for k, (lo, hi) in AFFINE_RANGES.items()
    }
    canvas = _pad(images, AFFINE_SIZE)

    def take(idx: np.ndarray) -> Fields:
        chosen = {k: v[idx] for k, v in params.items()}
        warped = affine_warp(canvas[idx], affine_matrices(chosen), chosen["ty"], chosen["tx"])
        meta = [json.dumps({k: float(v[i]) for k, v in chosen.items()}) for i in range(len(idx))]
        return {IMAGE_FIELD: warped, "cls": labels[idx], "json": meta}

    return SplitSource(len(images), take)


def affine_matrices(params: dict[str, np.ndarray]) -> np.ndarray:
    """Forward 2×2 maps [N,2,2] in (y, x) coordinates: rotation · shear · scale."""
    theta = np.deg2rad(params["rotation_deg"])
    cos, sin = np.cos(theta), np.sin(theta)
    one, zero = np.ones_like(theta), np.zeros_like(theta)
    rotate = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shear = np.stack([np.stack([one, zero], -1), np.stack([params["shear"], one], -1)], -2)
    scale = np.stack(
        [np.stack([params["scale_y"], zero], -1), np.stack([zero, params["scale_x"]], -1)], -2
    )
    return rotate @ shear @ scale


def affine_warp(
    images_N1HW: np.ndarray, forward_N22: np.ndarray, ty: np.ndarray, tx: np.ndarray
) -> np.ndarray:
    """Apply y' = A (y - c) + c + t about the image centre, by bilinear inverse mapping."""
    n, _, h, w = images_N1HW.shape
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    out_yx_P2 = np.stack(list(np.mgrid[0:h, 0:w]), axis=-1).reshape(-1, 2).astype(np.float64)
    rel_NP2 = out_yx_P2[None] - centre - np.stack([ty, tx], -1)[:, None]
    src_NP2 = np.einsum("nij,npj->npi", np.linalg.inv(forward_N22), rel_NP2) + centre
    y0, x0 = np.floor(src_NP2[..., 0]), np.floor(src_NP2[..., 1])
    wy, wx = src_NP2[..., 0] - y0, src_NP2[..., 1] - x0
    flat = images_N1HW.reshape(n, h * w).astype(np.float64)
    out = np.zeros((n, h * w))
    for dy, dx, weight in (
        (0, 0, (1 - wy) * (1 - wx)),
        (0, 1, (1 - wy) * wx),
        (1, 0, wy * (1 - wx)),
        (1, 1, wy * wx),
    ):
        yy, xx = (y0 + dy).astype(np.int64), (x0 + dx).astype(np.int64)
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        pixel = np.take_along_axis(flat, np.where(inside, yy * w + xx, 0), axis=1)
        out += np.where(inside, pixel, 0.0) * weight
    return np.clip(np.round(out), 0, 255).astype(np.uint8).reshape(n, 1, h, w)
