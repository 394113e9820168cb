"""Tiny on-disk datasets shared by the data tests (each written once per session)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import ShardsConfig, write_shards

# 7 train shards (odd on purpose) and 3 test shards, 12×12 images: written in ~0.1 s.
TRAIN, TEST, SHARD, SIZE = 700, 250, 100, 12


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """Write `array` (uint8) as an MNIST-format IDX file, gzipped or not."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
    return path


def fake_mnist(
    n_train: int = 80, n_test: int = 40, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Digit-like 28×28 images, *sorted by class* like many raw sources."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.sort(rng.integers(0, 10, size=n)).astype(np.uint8)
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 6:22, 6:22] = rng.integers(0, 256, size=(n, 16, 16), dtype=np.uint8)
        out[split] = (images, labels)
    return out


def write_fake_mnist(folder: Path, gz: bool, **kw: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    data = fake_mnist(**kw)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = data[split]
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return data


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only shared dataset: do not modify (copy it first, see `synthetic_copy`)."""
    out = tmp_path_factory.mktemp("synthetic")
    write_shards(
        ShardsConfig(
            dataset="synthetic",
            out=str(out),
            train_samples=TRAIN,
            test_samples=TEST,
            shard_size=SHARD,
            image_size=SIZE,
            seed=3,
        )
    )
    return out


@pytest.fixture
def synthetic_copy(synthetic_dir: Path, tmp_path: Path) -> Path:
    """A private copy of `synthetic_dir` that a test may corrupt."""
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(synthetic_dir, copy)
    return copy


@pytest.fixture(scope="session")
def mnist_idx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("idx")
    write_fake_mnist(folder, gz=True)
    return folder


@pytest.fixture(scope="session")
def layout() -> dict[str, int]:
    """Sizes of `synthetic_dir`."""
    return {"train": TRAIN, "test": TEST, "shard": SHARD, "size": SIZE}


@pytest.fixture(scope="session")
def idx_writer():
    """`write_idx(path, array, gz)` and `write_fake_mnist(folder, gz, **sizes)` for tests."""
    return write_idx, write_fake_mnist
