"""Shared fixtures: tiny synthetic shards and a tiny run config."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.data import ShardsConfig, write_shards

TINY_MODEL = ["model.preset=tiny"]


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


@pytest.fixture
def tiny_config():
    """tiny_config(shards, storage, *overrides) -> a validated RunConfig for a tiny CPU run."""
    return make_tiny_config


def make_tiny_config(shards, storage, *extra: str):
    return load_config(
        None,
        [
            *TINY_MODEL,
            f"data.shards={shards}",
            f"run.storage_path={storage}",
            "data.loader_workers=0",
            "data.shuffle_buffer=64",
            "train.eval_batch_size=32",
            "train.batch_size=32",
            "train.epochs=2",
            "train.log_every=3",
            "run.use_gpu=false",
            "run.name=tiny",
            *extra,
        ],
    )
