"""Fixtures for every test folder."""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import shutil
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import ShardsConfig, write_shards
from pipeline.data.sources import synthetic_prototypes


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
def idx_writer():
    """`write_idx(path, array, gz)` and `write_fake_mnist(folder, gz, **sizes)` for tests."""
    return write_idx, write_fake_mnist


def write_pattern_idx(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Learnable 28×28 "digits" as the four MNIST IDX files: each class a bar at its own angle
    plus a blob (the synthetic patterns), with brightness jitter and noise."""
    folder.mkdir(parents=True, exist_ok=True)
    protos = synthetic_prototypes(10, 1, 20)[:, 0]  # [10, 20, 20], placed in a 28×28 frame
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.zeros((n, 28, 28))
        images[:, 4:24, 4:24] = protos[labels] * rng.uniform(0.7, 1.0, size=(n, 1, 1))
        images = np.clip(images + rng.uniform(0, 0.15, size=images.shape), 0, 1)
        write_idx(
            folder / f"{prefix}-images-idx3-ubyte", np.round(images * 255).astype(np.uint8), True
        )
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), True)
    return folder


@pytest.fixture(scope="session")
def pattern_idx_dir(tmp_path_factory):
    """A learnable MNIST-format IDX folder: 300 train / 100 test images."""
    return write_pattern_idx(tmp_path_factory.mktemp("patterns"), 300, 100)


@pytest.fixture(scope="session")
def multimnist_shards(tmp_path_factory, pattern_idx_dir):
    """MultiMNIST (36×36, two overlaid patterns, rec0/rec1 parts) from `pattern_idx_dir`:
    600 train / 200 test samples."""
    out = tmp_path_factory.mktemp("shards") / "multimnist"
    write_shards(
        ShardsConfig(
            dataset="multimnist",
            data_dir=str(pattern_idx_dir),
            out=str(out),
            pairs_per_digit=2,
            shard_size=200,
        )
    )
    return out


@pytest.fixture(scope="session")
def affine_shards(tmp_path_factory, pattern_idx_dir):
    """affine-test (40×40: translated train, affine-warped test) from `pattern_idx_dir`."""
    out = tmp_path_factory.mktemp("shards") / "affine"
    write_shards(
        ShardsConfig(
            dataset="affine-test", data_dir=str(pattern_idx_dir), out=str(out), shard_size=100
        )
    )
    return out


# --- a loopback http server over a folder ---------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _serving(folder, userinfo: str = "") -> Iterator[str]:
    if shutil.which("curl") is None:
        pytest.skip("curl not installed (webdataset reads http(s) through curl)")
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.handle_error = lambda *args: None  # type: ignore[method-assign] (probes hang up early)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://{userinfo}127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def serve_http():
    """serve_http(folder, userinfo="") -> a context manager: an http server on 127.0.0.1 over
    `folder`, yielding its URL without a trailing slash (`userinfo`, e.g. "user:pw@", goes
    into the URL; the server ignores it)."""
    return _serving
