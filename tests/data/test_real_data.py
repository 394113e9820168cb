"""Debian's Fashion-MNIST IDX files (package dataset-fashion-mnist) through the `idx` source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data import ShardsConfig, open_loader, write_shards
from pipeline.data.sources import find_idx_files, read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def fashion_dir() -> Path:
    try:
        find_idx_files(str(FASHION))
    except FileNotFoundError:
        pytest.skip(
            f"Fashion-MNIST IDX files not in {FASHION}: apt-get install dataset-fashion-mnist"
        )
    return FASHION


def test_fashion_mnist_idx_shards_round_trip(fashion_dir, tmp_path):
    info = write_shards(
        ShardsConfig(
            dataset="idx",
            data_dir=str(fashion_dir),
            out=str(tmp_path),
            train_samples=2000,
            test_samples=500,
            shard_size=1000,
            name="fashion-mnist",
        )
    )
    assert info.image_shape == (1, 28, 28) and info.num_classes == 10
    test_images = read_idx(str(fashion_dir / "t10k-images-idx3-ubyte.gz"))
    loader = open_loader(tmp_path, "test", batch_size=100, training=False)
    images = np.concatenate([(b.to("cpu").images * 255).round().byte().numpy() for b in loader])
    assert len(images) == 500
    # Every shard image is one of the real test images (a random subset, shuffled).
    real = {img.tobytes() for img in test_images}
    assert all(img[0].tobytes() in real for img in images)
    labels = np.concatenate(
        [b.labels.numpy() for b in open_loader(tmp_path, "train", batch_size=100)]
    )
    assert len(labels) == 2000 and len(np.unique(labels)) == 10
