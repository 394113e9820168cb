"""Fixtures for every test folder."""

from __future__ import annotations

import pytest

from pipeline.data import ShardsConfig, write_shards


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """12x12 learnable synthetic data: 320 train / 80 test samples in shards of 50 (odd count)."""
    out = tmp_path_factory.mktemp("shards") / "tiny"
    write_shards(
        ShardsConfig(
            dataset="synthetic",
            out=str(out),
            image_size=12,
            train_samples=320,
            test_samples=80,
            shard_size=50,
            seed=1,
        )
    )
    return out
