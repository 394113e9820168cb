"""Slow tier: CapsNet on real Fashion-MNIST (Debian's dataset-fashion-mnist), short CPU run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data import ShardsConfig, write_shards
from pipeline.train.loop import run_dir_for
from pipeline.train.trainer import train

FASHION = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
        reason="needs Debian's Fashion-MNIST: apt-get install dataset-fashion-mnist",
    ),
]


def test_capsnet_learns_fashion_mnist(tmp_path):
    shards = tmp_path / "fmnist"
    write_shards(
        ShardsConfig(
            dataset="idx",
            data_dir=str(FASHION),
            out=str(shards),
            train_samples=3000,
            test_samples=1000,
            shard_size=1000,
        )
    )
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [
            f"data.shards={shards}",
            f"run.storage_path={tmp_path}",
            "run.name=fmnist",
            "train.epochs=3",
            "data.loader_workers=0",
        ],
    )
    summary = train(cfg, local=True)
    rows = [
        json.loads(line) for line in (run_dir_for(cfg) / "metrics.jsonl").read_text().splitlines()
    ]
    accs = [r["test_accuracy"] for r in rows]
    assert all(r["test_samples"] == 1000 for r in rows)
    assert accs[-1] > 0.5, accs  # chance is 0.1
    assert max(accs[1:]) > accs[0], f"no progress after the first epoch: {accs}"
    assert summary.best_test_accuracy == max(accs)
