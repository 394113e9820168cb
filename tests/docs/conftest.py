"""The workspace a doc block runs in: what a reader has after cloning, and nothing else.

A fresh folder per block laid out like a checkout: copies of configs/, cluster/ and
pyproject.toml, links to the code (pipeline/, capscore/: `capsnet submit` uploads the project
folder and checks it is one), an empty HOME,
and MNIST-format files where `capsnet shards --dataset mnist --data-dir data --download` looks
for them (data/MNIST/raw/, so nothing is downloaded): the learnable pattern digits of
tests/conftest.py, written by its IDX writer. Everything else (shards, runs) the block makes
itself with the real commands.
"""

from __future__ import annotations

import gzip
import shutil

import pytest
from doc_commands import REPO


@pytest.fixture(scope="session")
def mnist_raw(pattern_idx_dir, tmp_path_factory):
    """The pattern IDX files uncompressed, as torchvision keeps MNIST in ROOT/MNIST/raw."""
    raw = tmp_path_factory.mktemp("mnist") / "raw"
    raw.mkdir()
    for gz in pattern_idx_dir.glob("*.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    return raw


@pytest.fixture
def workspace(tmp_path, mnist_raw):
    ws = tmp_path / "ws"
    ws.mkdir()
    for folder in ("configs", "cluster"):
        shutil.copytree(REPO / folder, ws / folder)
    shutil.copy(REPO / "pyproject.toml", ws)
    for package in ("pipeline", "capscore"):
        (ws / package).symlink_to(REPO / package, target_is_directory=True)
    shutil.copytree(mnist_raw, ws / "data" / "MNIST" / "raw")
    (ws / "home").mkdir()
    return ws
