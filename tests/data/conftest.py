"""Tiny on-disk datasets shared by the data tests (each written once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data import ShardsConfig, write_shards

# 7 train shards (odd on purpose) and 3 test shards, 12×12 images: written in ~0.1 s.
TRAIN, TEST, SHARD, SIZE = 700, 250, 100, 12


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
def mnist_idx_dir(tmp_path_factory: pytest.TempPathFactory, idx_writer) -> Path:
    folder = tmp_path_factory.mktemp("idx")
    idx_writer[1](folder, gz=True)
    return folder


@pytest.fixture(scope="session")
def layout() -> dict[str, int]:
    """Sizes of `synthetic_dir`."""
    return {"train": TRAIN, "test": TEST, "shard": SHARD, "size": SIZE}
