"""Writing shards: round trip, determinism, global shuffle, atomicity, every source's layout."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipeline.data import DataError, MissingDataError, ShardsConfig, load_dataset_info, write_shards
from pipeline.data import shards as shards_module
from pipeline.data.sources import read_idx, synthetic_source
from pipeline.data.tario import iter_samples


def read_split(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    """All samples of a split, keyed by sample key, read with the project's reader."""
    info = load_dataset_info(out)
    samples = {}
    for url in info.shard_urls(split):
        with open(url, "rb") as f:
            samples.update(dict(iter_samples(f)))
    return samples


def test_dataset_json_describes_the_shards(synthetic_dir, layout):
    TRAIN, TEST, SIZE = layout["train"], layout["test"], layout["size"]
    info = load_dataset_info(synthetic_dir)
    assert (
        info.image_shape == (1, SIZE, SIZE)
        and info.num_classes == 10
        and info.label_kind == "index"
    )
    assert [s.name for s in info.split("train").shards] == [f"train-{k:06d}.tar" for k in range(7)]
    assert info.split("train").num_samples == TRAIN and info.split("test").num_samples == TEST
    for shard in info.split("train").shards:
        data = (synthetic_dir / shard.name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard.bytes, shard.sha256)
    assert info.seed == 3 and "synthetic" in info.command
    assert load_dataset_info(synthetic_dir / "dataset.json") == info
    assert load_dataset_info(f"file://{synthetic_dir}/dataset.json").name == info.name


def test_round_trip_pixels_and_labels(synthetic_dir, layout):
    TRAIN, TEST, SIZE = layout["train"], layout["test"], layout["size"]
    source = synthetic_source(image_size=SIZE, train_samples=TRAIN, test_samples=TEST, seed=3)
    for split in ("train", "test"):
        samples = read_split(synthetic_dir, split)
        indices = np.array(sorted(int(k) for k in samples))
        assert len(indices) == source.splits[split].num_samples
        expected = source.splits[split].take(indices)
        for row, index in enumerate(indices):
            sample = samples[f"{index:09d}"]
            assert sample["img.u8"] == expected["img.u8"][row].tobytes()
            assert int(sample["cls"]) == expected["cls"][row]


def test_same_inputs_same_bytes(tmp_path):
    def digests(out: Path) -> dict[str, str]:
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))
        }

    kw = dict(dataset="synthetic", train_samples=300, test_samples=50, shard_size=128, image_size=8)
    write_shards(ShardsConfig(out=str(tmp_path / "a"), seed=1, **kw))
    write_shards(ShardsConfig(out=str(tmp_path / "b"), seed=1, **kw))
    write_shards(ShardsConfig(out=str(tmp_path / "c"), seed=2, **kw))
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert digests(tmp_path / "a") != digests(tmp_path / "c")


def test_class_sorted_input_comes_out_mixed(tmp_path, idx_writer):
    _, write_fake_mnist = idx_writer
    write_fake_mnist(tmp_path / "raw", gz=False, n_train=200, n_test=20)  # labels sorted by class
    write_shards(
        ShardsConfig(
            dataset="idx", data_dir=str(tmp_path / "raw"), out=str(tmp_path / "s"), shard_size=50
        )
    )
    info = load_dataset_info(tmp_path / "s")
    for url in info.shard_urls("train"):
        with open(url, "rb") as f:
            labels = [int(fields["cls"]) for _, fields in iter_samples(f)]
        assert len(set(labels)) >= 6, f"{url} holds too few classes: {sorted(set(labels))}"


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reads_gz_and_raw(tmp_path, gz, idx_writer):
    _, write_fake_mnist = idx_writer
    data = write_fake_mnist(tmp_path / "raw", gz=gz, n_train=30, n_test=12)
    info = write_shards(
        ShardsConfig(dataset="idx", data_dir=str(tmp_path / "raw"), out=str(tmp_path / "s"))
    )
    assert info.name == "idx:raw" and info.image_shape == (1, 28, 28)
    for split in ("train", "test"):
        images, labels = data[split]
        samples = read_split(tmp_path / "s", split)
        assert len(samples) == len(images)
        for key, fields in samples.items():
            assert fields["img.u8"] == images[int(key)].tobytes()
            assert int(fields["cls"]) == labels[int(key)]


def test_idx_errors_name_the_problem(tmp_path, idx_writer):
    write_idx, write_fake_mnist = idx_writer
    with pytest.raises(MissingDataError, match="t10k-labels-idx1-ubyte"):
        write_fake_mnist(tmp_path, gz=True)
        (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
        write_shards(ShardsConfig(dataset="idx", data_dir=str(tmp_path), out=str(tmp_path / "s")))
    bad = write_idx(tmp_path / "bad", np.zeros((2, 3), np.uint8), gz=False)
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(DataError, match="header says"):
        read_idx(str(bad))


def test_plain_tar_and_plain_webdataset_read_the_shards(synthetic_dir, layout):
    SIZE, SHARD = layout["size"], layout["shard"]
    first = synthetic_dir / "test-000000.tar"
    with tarfile.open(first) as tar:
        names = tar.getnames()
    assert names[:2] == [n.replace(".cls", ".img.u8") for n in names[1:2]] + names[1:2]
    dataset = wds.WebDataset(str(first), shardshuffle=False).decode()
    sample = next(iter(dataset))
    assert len(sample["img.u8"]) == SIZE * SIZE and isinstance(sample["cls"], int)
    assert sum(1 for _ in dataset) == SHARD


def test_existing_output_needs_overwrite_and_stale_info_goes_first(tmp_path, monkeypatch):
    kw = dict(
        dataset="synthetic", out=str(tmp_path), train_samples=64, test_samples=16, image_size=8
    )
    write_shards(ShardsConfig(**kw))
    with pytest.raises(DataError, match="--overwrite"):
        write_shards(ShardsConfig(**kw))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_module, "_atomic_write", crash)
    with pytest.raises(KeyboardInterrupt):
        write_shards(ShardsConfig(**kw, overwrite=True, seed=9))
    # The interrupted run left shards but no dataset.json claiming them.
    assert not (tmp_path / "dataset.json").exists()
    assert not list(tmp_path.glob("*.partial"))


def test_interrupted_shard_is_never_named_like_a_complete_one(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        yield "000000000", {"img.u8": b"x", "cls": b"1"}
        raise RuntimeError("disk full")

    monkeypatch.setattr(shards_module, "_serialised", explode)
    with pytest.raises(RuntimeError):
        write_shards(
            ShardsConfig(dataset="synthetic", out=str(tmp_path), train_samples=8, test_samples=8)
        )
    assert not list(tmp_path.glob("*.tar")) and not (tmp_path / "dataset.json").exists()


def test_config_validation():
    with pytest.raises(DataError, match="unknown dataset"):
        ShardsConfig(dataset="imagenet", out="x")
    with pytest.raises(DataError, match="--data-dir"):
        ShardsConfig(dataset="idx", out="x")
    with pytest.raises(DataError, match="shard_size"):
        ShardsConfig(dataset="synthetic", out="x", shard_size=0)


def test_torchvision_without_download_says_what_is_missing(tmp_path):
    with pytest.raises(MissingDataError) as err:
        write_shards(ShardsConfig(dataset="mnist", data_dir=str(tmp_path), out=str(tmp_path / "s")))
    message = str(err.value)
    assert (
        "train-images-idx3-ubyte" in message
        and "--download" in message
        and "--dataset idx" in message
    )
    with pytest.raises(MissingDataError, match="data_batch_1"):
        write_shards(
            ShardsConfig(dataset="cifar10", data_dir=str(tmp_path), out=str(tmp_path / "s"))
        )


def test_mnist_family_reads_a_plain_idx_folder(tmp_path, idx_writer):
    _, write_fake_mnist = idx_writer
    write_fake_mnist(tmp_path / "FashionMNIST" / "raw", gz=True, n_train=20, n_test=10)
    info = write_shards(
        ShardsConfig(dataset="fashion-mnist", data_dir=str(tmp_path), out=str(tmp_path / "s"))
    )
    assert info.class_names[0] == "T-shirt/top" and info.split("train").num_samples == 20


def test_subset_limits(tmp_path, mnist_idx_dir):
    info = write_shards(
        ShardsConfig(
            dataset="idx",
            data_dir=str(mnist_idx_dir),
            out=str(tmp_path),
            train_samples=25,
            test_samples=7,
            shard_size=10,
        )
    )
    assert [s.num_samples for s in info.split("train").shards] == [10, 10, 5]
    assert info.split("test").num_samples == 7


def test_multimnist_shapes_and_labels(tmp_path, mnist_idx_dir):
    info = write_shards(
        ShardsConfig(
            dataset="multimnist", data_dir=str(mnist_idx_dir), out=str(tmp_path), pairs_per_digit=2
        )
    )
    assert info.image_shape == (1, 36, 36) and info.label_kind == "multi-hot"
    assert info.split("train").num_samples == 160 and info.extra_fields == (
        "rec0.u8",
        "rec1.u8",
        "json",
    )
    for fields in list(read_split(tmp_path, "train").values())[:40]:
        hot = np.frombuffer(fields["hot.u8"], np.uint8)
        meta = json.loads(fields["json"])
        a, b = meta["classes"]
        assert a != b and hot.sum() == 2 and hot[a] == hot[b] == 1
        assert all(abs(s) <= 4 for pair in meta["shifts"] for s in pair)
        rec0, rec1, merged = (
            np.frombuffer(fields[k], np.uint8).astype(int) for k in ("rec0.u8", "rec1.u8", "img.u8")
        )
        assert len(merged) == 36 * 36
        np.testing.assert_array_equal(merged, np.minimum(rec0 + rec1, 255))


def test_multimnist_labels_are_as_wide_as_the_dataset_in_every_split(tmp_path, idx_writer):
    # The test split lacks class 9: its multi-hot labels must still have 10 entries.
    write_idx, _ = idx_writer
    rng = np.random.default_rng(0)
    for prefix, labels in (("train", np.arange(40) % 10), ("t10k", np.arange(18) % 9)):
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images, gz=True)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), gz=True)
    info = write_shards(
        ShardsConfig(dataset="multimnist", data_dir=str(tmp_path), out=str(tmp_path / "s"))
    )
    assert info.num_classes == 10
    for split in ("train", "test"):
        for fields in read_split(tmp_path / "s", split).values():
            assert len(fields["hot.u8"]) == 10


def test_affine_test_shapes_and_parameters(tmp_path, mnist_idx_dir):
    info = write_shards(
        ShardsConfig(dataset="affine-test", data_dir=str(mnist_idx_dir), out=str(tmp_path))
    )
    assert info.image_shape == (1, 40, 40) and info.label_kind == "index"
    source_test = read_idx(str(mnist_idx_dir / "t10k-images-idx3-ubyte.gz"))
    for split in ("train", "test"):
        samples = read_split(tmp_path, split)
        for key, fields in samples.items():
            image = np.frombuffer(fields["img.u8"], np.uint8)
            assert image.size == 40 * 40 and 0 <= int(fields["cls"]) < 10
            meta = json.loads(fields["json"])
            if split == "train":
                assert set(meta) == {"ty", "tx"} and max(abs(meta["ty"]), abs(meta["tx"])) <= 6
                assert image.sum() > 0
            else:
                assert -20 <= meta["rotation_deg"] <= 20 and 0.8 <= meta["scale_x"] <= 1.2
                assert abs(meta["shear"]) <= 0.2
                # Ink is roughly conserved (scale changes area by ≤ 1.44×).
                ink, original = image.sum(), source_test[int(key)].astype(int).sum()
                assert 0.5 * original < ink < 1.6 * original


def test_affine_warp_identity_and_pure_translation():
    from pipeline.data.generated import affine_warp

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 1, 10, 10), dtype=np.uint8)
    eye = np.repeat(np.eye(2)[None], 3, axis=0)
    np.testing.assert_array_equal(affine_warp(images, eye, np.zeros(3), np.zeros(3)), images)
    moved = affine_warp(images, eye, np.full(3, 2.0), np.full(3, -1.0))
    np.testing.assert_array_equal(moved[:, :, 2:, :-1], images[:, :, :-2, 1:])


def test_synthetic_is_learnable_by_a_trivial_classifier():
    # Nearest class mean on train, evaluated on test: far above the 10% of chance.
    source = synthetic_source(image_size=16, train_samples=500, test_samples=200, seed=0)

    def arrays(split):
        fields = source.splits[split].take(np.arange(source.splits[split].num_samples))
        return fields["img.u8"].reshape(len(fields["cls"]), -1).astype(float), fields["cls"]

    x, y = arrays("train")
    xt, yt = arrays("test")
    means = np.stack([x[y == k].mean(0) for k in range(10)])
    predicted = np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == yt).mean() > 0.5


def test_synthetic_multi_hot(tmp_path):
    info = write_shards(
        ShardsConfig(
            dataset="synthetic",
            out=str(tmp_path),
            multi_hot=True,
            channels=3,
            image_size=10,
            num_classes=4,
            train_samples=20,
            test_samples=8,
        )
    )
    assert info.label_kind == "multi-hot" and info.image_shape == (3, 10, 10)
    for fields in read_split(tmp_path, "test").values():
        assert np.frombuffer(fields["hot.u8"], np.uint8).sum() == 2


def test_dataset_json_round_trips_through_text(synthetic_dir):
    info = load_dataset_info(synthetic_dir)
    again = type(info).from_dict(json.load(io.StringIO(info.to_json())), base_url=info.base_url)
    assert again == info
