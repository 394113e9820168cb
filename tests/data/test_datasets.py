"""Every entry of DATASETS is exercised, chosen by `spec.reads`: a new entry is tested from its first line.

IDX-reading entries write shards from tiny fake IDX files, generated ones generate, and
torchvision-backed ones must explain, without downloading, which files are missing.
No test here may open a network connection (see `no_network`).
"""

from __future__ import annotations

import gzip
import hashlib
import socket
import struct
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from pipeline.data import DataError, MissingDataError, ShardsConfig, load_dataset_info, write_shards
from pipeline.data.info import IMAGE_FIELD, LABEL_FIELDS
from pipeline.data.shards import DATASETS, DatasetSpec, Reads, build_source, describe_datasets
from pipeline.data.sources import check_labels
from pipeline.data.tario import iter_samples

TESTED_READS = {"idx", "torchvision", "nothing"}
"""The values of `DatasetSpec.reads` that `test_every_dataset_writes_or_explains` handles."""
N_TRAIN, N_TEST = 30, 20


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to connect anywhere fails the test (a download would be a bug)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a data test tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """`array` (uint8) as a gzipped MNIST-format IDX file at `path` + ".gz"."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.with_name(path.name + ".gz").write_bytes(gzip.compress(data, mtime=0))


def write_digits(folder: Path, labels: dict[str, np.ndarray] | None = None) -> Path:
    """Four gzipped MNIST-format IDX files in `folder`: 28×28 digits, labels 0..9 by default."""
    labels = labels or {
        "train": np.arange(N_TRAIN) % 10,
        "test": np.arange(N_TEST) % 10,
    }
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        n = len(labels[split])
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 6:22, 6:22] = rng.integers(1, 256, size=(n, 16, 16), dtype=np.uint8)
        write_idx_gz(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx_gz(folder / f"{prefix}-labels-idx1-ubyte", labels[split].astype(np.uint8))
    return folder


def check_written(out: Path, name: str, counts: dict[str, int], num_classes: int) -> None:
    """dataset.json matches what the shards hold, sample by sample."""
    info = load_dataset_info(out)
    assert info.source["dataset"] == name and info.num_classes == num_classes
    assert {split: s.num_samples for split, s in info.splits.items()} == counts
    channels, height, width = info.image_shape
    label_field = LABEL_FIELDS[info.label_kind]
    for split_info in info.splits.values():
        keys = set()
        for shard in split_info.shards:
            data = (out / shard.name).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (shard.bytes, shard.sha256)
            with open(out / shard.name, "rb") as f:
                samples = list(iter_samples(f))
            assert len(samples) == shard.num_samples
            for key, fields in samples:
                keys.add(key)
                assert set(fields) == {IMAGE_FIELD, label_field, *info.extra_fields}
                assert len(fields[IMAGE_FIELD]) == channels * height * width
                if label_field == "cls":
                    assert 0 <= int(fields["cls"]) < num_classes
                else:
                    hot = np.frombuffer(fields[label_field], np.uint8)
                    assert len(hot) == num_classes and hot.sum() >= 1
        assert len(keys) == split_info.num_samples  # no sample written twice


def tar_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_every_dataset_is_covered():
    # A new kind of source needs a branch in test_every_dataset_writes_or_explains first.
    assert set(get_args(Reads)) == TESTED_READS
    assert isinstance(DATASETS, dict) and DATASETS
    for name, spec in DATASETS.items():
        assert isinstance(spec, DatasetSpec) and spec.reads in TESTED_READS, name


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_dataset_writes_or_explains(name, tmp_path):
    spec = DATASETS[name]
    out = tmp_path / "out"
    if spec.reads == "idx":
        digits = write_digits(tmp_path / "raw")
        config = ShardsConfig(dataset=name, data_dir=str(digits), out=str(out), shard_size=7)
        write_shards(config)
        check_written(out, name, {"train": N_TRAIN, "test": N_TEST}, num_classes=10)
        write_shards(ShardsConfig(**{**vars(config), "out": str(tmp_path / "again")}))
        assert tar_digests(out) == tar_digests(tmp_path / "again")
    elif spec.reads == "nothing":
        kw = dict(train_samples=24, test_samples=9, image_size=8, num_classes=3, shard_size=10)
        write_shards(ShardsConfig(dataset=name, out=str(out), **kw))
        check_written(out, name, {"train": 24, "test": 9}, num_classes=3)
        write_shards(ShardsConfig(dataset=name, out=str(tmp_path / "again"), **kw))
        assert tar_digests(out) == tar_digests(tmp_path / "again")
    elif spec.reads == "torchvision":
        empty = tmp_path / "data"
        empty.mkdir()
        with pytest.raises(MissingDataError) as err:
            write_shards(ShardsConfig(dataset=name, data_dir=str(empty), out=str(out)))
        message = str(err.value)
        listed = [line.strip() for line in message.splitlines() if line.startswith("  ")]
        assert listed, f"the error lists no missing file:\n{message}"
        for path in listed:
            assert path.startswith(str(empty)) and not Path(path).exists(), path
        assert f"--dataset {name}" in message and "--download" in message
        # Nothing fetched, nothing created.
        assert list(empty.iterdir()) == [] and not out.exists()
    else:
        pytest.fail(f"no test for DatasetSpec.reads={spec.reads!r} ({name})")


@pytest.mark.parametrize("name", list(DATASETS))
def test_spec_is_well_formed_and_data_dir_rule_follows_it(name):
    spec = DATASETS[name]
    assert spec.description.strip() and "\n" not in spec.description
    assert name in describe_datasets() and spec.description in describe_datasets()
    if spec.needs_data_dir:
        with pytest.raises(DataError, match=f"--dataset {name} needs --data-dir"):
            ShardsConfig(dataset=name, out="x")
    else:
        assert ShardsConfig(dataset=name, out="x").spec is spec
    if spec.reads == "idx":
        assert spec.needs_data_dir  # IDX files have no default location


def test_build_source_calls_the_spec(monkeypatch):
    calls = []
    sentinel = object()

    def build(config):
        calls.append(config)
        return sentinel

    fake = DatasetSpec(description="a fake", reads="nothing", build=build)
    monkeypatch.setitem(DATASETS, "fake", fake)
    config = ShardsConfig(dataset="fake", out="x")
    assert build_source(config) is sentinel and calls == [config]


def test_spec_rejects_an_unknown_kind_and_a_data_dir_without_help():
    with pytest.raises(ValueError, match="reads"):
        DatasetSpec(description="x", reads="http", build=lambda c: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--data-dir"):
        DatasetSpec(description="x", reads="idx", build=lambda c: None, needs_data_dir=True)


# --- labels that are not class indices (issue 11, item 5) ---------------------------------


@pytest.mark.parametrize("name", [n for n, s in DATASETS.items() if s.reads == "idx"])
def test_idx_label_far_above_the_rest_is_refused(name, tmp_path):
    train = np.arange(N_TRAIN) % 10
    train[5] = 200
    digits = write_digits(tmp_path / "raw", {"train": train, "test": np.arange(N_TEST) % 10})
    with pytest.raises(DataError) as err:
        write_shards(ShardsConfig(dataset=name, data_dir=str(digits), out=str(tmp_path / "o")))
    message = str(err.value)
    assert "train-labels-idx1-ubyte" in message and "label 200 on 1 sample(s)" in message
    assert "t10k-labels" not in message  # the test file is fine
    assert "num_classes would be 201" in message
    assert not (tmp_path / "o").exists()


def test_idx_subset_missing_some_classes_is_accepted(tmp_path):
    kept = np.array([c for c in range(10) if c not in (3, 7)])
    digits = write_digits(
        tmp_path / "raw",
        {"train": np.resize(kept, N_TRAIN), "test": np.resize(kept, N_TEST)},
    )
    info = write_shards(ShardsConfig(dataset="idx", data_dir=str(digits), out=str(tmp_path / "o")))
    assert info.num_classes == 10


def test_check_labels_rule():
    check_labels({"a": np.arange(10), "b": np.array([0, 1])})
    check_labels({"a": np.array([0, 2, 4, 6]), "b": np.array([], dtype=np.int64)})  # 4 < 8
    check_labels({"a": np.array([], dtype=np.int64)})
    with pytest.raises(DataError, match=r"a: label 8 on 2 sample\(s\)"):
        check_labels({"a": np.array([0, 2, 4, 8, 8])})  # 4 distinct, 8 >= 8
    with pytest.raises(DataError, match=r"b: label -1 on 1 sample\(s\)"):
        check_labels({"a": np.arange(10), "b": np.array([-1, 3])})
