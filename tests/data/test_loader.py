"""The streaming loader: shapes, exact eval coverage, equal train batches, bad data."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.data import (
    Batch,
    DataConfig,
    DataError,
    MissingDataError,
    check_splits,
    load_dataset_info,
    open_loader,
)
from pipeline.data.augment import shift_images
from pipeline.data.tario import TarWriter, iter_samples


def _fingerprints(batch: Batch) -> list[tuple[str, int]]:
    batch = batch.to("cpu")  # finished: shifted, float in [0, 1]
    images, labels = batch.images, batch.labels
    pixels = (images * 255).round().to(torch.uint8).numpy()
    return [
        (hashlib.md5(p.tobytes()).hexdigest(), int(y)) for p, y in zip(pixels, labels, strict=True)
    ]


def _stored(shard_dir, split) -> Counter:
    info = load_dataset_info(shard_dir)
    out = Counter()
    for url in info.shard_urls(split):
        with open(url, "rb") as f:
            for _, fields in iter_samples(f):
                out[(hashlib.md5(fields["img.u8"]).hexdigest(), int(fields["cls"]))] += 1
    return out


def test_batches_have_documented_types(synthetic_dir, layout):
    loader = open_loader(synthetic_dir, "train", batch_size=32)
    raw = next(iter(loader))
    # As loaded: uint8 pixels and each sample's pending shift; .to(device) finishes them.
    assert raw.images.dtype == torch.uint8 and raw.shifts.shape == (32, 2) and raw.max_shift == 2
    assert raw.shifts.abs().max() <= 2
    batch = raw.to("cpu")
    images, labels = batch.images, batch.labels
    assert batch.parts is None and batch.part_classes is None and batch.shifts is None
    assert images.shape == (32, 1, layout["size"], layout["size"]) and images.dtype == torch.float32
    assert labels.shape == (32,) and labels.dtype == torch.int64
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert len(loader) == layout["train"] // 32


@pytest.mark.parametrize("world, batch", [(1, 64), (2, 32), (3, 50), (4, 7), (8, 16)])
def test_eval_reads_every_sample_exactly_once(synthetic_dir, world, batch):
    seen = Counter()
    for rank in range(world):
        loader = open_loader(
            synthetic_dir, "test", batch_size=batch, rank=rank, world_size=world, training=False
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(len(b) == batch for b in batches[:-1])
        for b in batches:
            seen.update(_fingerprints(b))
    assert seen == _stored(synthetic_dir, "test")


def test_two_ranks_odd_shard_count_finish_together(synthetic_dir, layout):
    # 7 shards over 2 ranks: each rank still yields exactly the same number of full batches.
    counts, fingerprints = [], []
    for rank in range(2):
        loader = open_loader(
            synthetic_dir, "train", batch_size=24, rank=rank, world_size=2, epoch=1
        )
        batches = list(loader)
        assert all(len(b) == 24 for b in batches)
        counts.append((len(batches), len(loader)))
        fingerprints.append({f for b in batches for f in _fingerprints(b)})
    assert counts[0] == counts[1] == (layout["train"] // 2 // 24,) * 2
    assert not fingerprints[0] & fingerprints[1], "ranks must see different samples"


def test_workers_split_the_rank_and_report_stats(synthetic_dir, layout):
    loader = open_loader(synthetic_dir, "test", batch_size=16, loader_workers=2, training=False)
    seen = Counter(f for b in loader for f in _fingerprints(b))
    assert seen == _stored(synthetic_dir, "test")
    stats = loader.stats
    assert (
        stats.samples == layout["test"]
        and stats.batches == len(loader)
        and stats.samples_skipped == 0
    )


def test_epochs_reorder_and_same_epoch_replays(synthetic_dir):
    def labels(epoch):
        loader = open_loader(synthetic_dir, "train", batch_size=50, epoch=epoch, seed=7)
        return torch.cat([b.labels for b in loader])

    assert torch.equal(labels(0), labels(0))
    assert not torch.equal(labels(0), labels(1))
    loader = open_loader(synthetic_dir, "train", batch_size=50, seed=7)
    loader.set_epoch(1)
    assert torch.equal(torch.cat([b.labels for b in loader]), labels(1))


def test_augmentation_only_in_training(synthetic_dir):
    plain = open_loader(synthetic_dir, "test", batch_size=250, training=False, augment=True)
    (only,) = list(plain)
    stored = _stored(synthetic_dir, "test")
    assert Counter(_fingerprints(only)) == stored  # unshifted
    shifted = open_loader(synthetic_dir, "train", batch_size=100, augment=True, shuffle_buffer=1)
    unshifted = open_loader(synthetic_dir, "train", batch_size=100, augment=False, shuffle_buffer=1)
    a, b = (next(iter(loader)).to("cpu").images for loader in (shifted, unshifted))
    assert not torch.equal(a, b)
    # Same samples in the same order: each augmented image is its original shifted by ≤ 2 px.
    a_u8, b_u8 = ((t * 255).round().to(torch.uint8).numpy() for t in (a, b))
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    for i in range(20):
        candidates = [
            shift_images(b_u8[i : i + 1], np.array([dy]), np.array([dx]), 2) for dy, dx in shifts
        ]
        assert any(np.array_equal(c[0], a_u8[i]) for c in candidates)


def test_multi_hot_labels(tmp_path):
    from pipeline.data import ShardsConfig, write_shards

    write_shards(
        ShardsConfig(
            dataset="synthetic",
            out=str(tmp_path),
            multi_hot=True,
            image_size=8,
            num_classes=5,
            train_samples=40,
            test_samples=10,
        )
    )
    labels = next(iter(open_loader(tmp_path, "train", batch_size=8))).to("cpu").labels
    assert (
        labels.shape == (8, 5) and labels.dtype == torch.float32 and torch.all(labels.sum(1) == 2)
    )


def test_missing_shard_fails_at_construction_naming_it(synthetic_copy):
    (synthetic_copy / "train-000004.tar").unlink()
    with pytest.raises(MissingDataError, match="train-000004.tar"):
        open_loader(synthetic_copy, "train", batch_size=8)
    open_loader(synthetic_copy, "test", batch_size=8)  # other splits unaffected


SAMPLE_BYTES = 4 * 512  # a 12×12 sample: header + image block + header + label block


def test_truncated_shard_is_skipped_counted_and_batches_stay_equal(synthetic_copy, layout):
    path = synthetic_copy / "train-000002.tar"
    path.write_bytes(path.read_bytes()[: 40 * SAMPLE_BYTES + 700])  # 40 whole samples, then cut
    lengths, lost = [], 0
    for rank in range(2):
        loader = open_loader(synthetic_copy, "train", batch_size=20, rank=rank, world_size=2)
        batches = list(loader)
        lengths.append(len(batches))
        assert len(batches) == len(loader) and all(len(b) == 20 for b in batches)
        stats = loader.stats
        assert stats.padded == stats.lost_in_bad_shards  # repeats fill exactly what was lost
        lost += stats.lost_in_bad_shards
    assert lengths[0] == lengths[1]
    assert 0 < lost <= layout["shard"] - 40
    with pytest.raises(DataError, match="train-000002.tar.*truncated"):
        for rank in range(2):
            list(
                open_loader(
                    synthetic_copy,
                    "train",
                    batch_size=20,
                    rank=rank,
                    world_size=2,
                    on_error="raise",
                )
            )


def test_eval_counts_what_a_corrupt_shard_lost(synthetic_copy, layout):
    path = synthetic_copy / "test-000001.tar"
    data = bytearray(path.read_bytes())
    data[10 * SAMPLE_BYTES + 257] = ord("X")  # break the ustar magic of sample 10's first member
    path.write_bytes(bytes(data))
    loader = open_loader(synthetic_copy, "test", batch_size=32, training=False)
    total = sum(len(b) for b in loader)
    # Samples 0-8 survive; sample 9 may be incomplete (its end is unknowable), so it goes too.
    lost = layout["shard"] - 9
    assert total == layout["test"] - lost
    assert loader.stats.lost_in_bad_shards == lost and loader.stats.bad_shards == 1


def test_wrong_shape_sample_is_skipped_or_raises(synthetic_copy, layout):
    path = synthetic_copy / "test-000000.tar"
    with open(path, "rb") as f:
        samples = list(iter_samples(f))
    samples[5][1]["img.u8"] = samples[5][1]["img.u8"][:-3]
    samples[6][1]["cls"] = b"banana"
    with open(path, "wb") as f, TarWriter(f) as writer:
        for key, fields in samples:
            writer.write(key, fields)
    loader = open_loader(synthetic_copy, "test", batch_size=64, training=False)
    assert sum(len(b) for b in loader) == layout["test"] - 2
    stats = loader.stats.as_dict()
    assert (
        stats["skipped_bad_shape"] == 1
        and stats["skipped_bad_label"] == 1
        and stats["samples_skipped"] == 2
    )
    with pytest.raises(DataError, match="expected 144"):
        list(open_loader(synthetic_copy, "test", batch_size=64, training=False, on_error="raise"))


def test_checksums_verified_on_request(synthetic_copy):
    path = synthetic_copy / "train-000003.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # a pixel: invisible to the tar parser
    path.write_bytes(bytes(data))
    open_loader(synthetic_copy, "train", batch_size=8)
    with pytest.raises(DataError, match="train-000003.tar"):
        open_loader(synthetic_copy, "train", batch_size=8, verify_checksums=True)


def test_rank_without_data_is_a_clear_error_at_construction(synthetic_dir, layout):
    with pytest.raises(DataError, match="one full batch"):
        open_loader(synthetic_dir, "train", batch_size=layout["train"], world_size=2, rank=1)
    with pytest.raises(DataError, match="at least one sample"):
        open_loader(
            synthetic_dir, "test", batch_size=4, world_size=layout["test"] + 1, training=False
        )
    with pytest.raises(ValueError, match="rank"):
        open_loader(synthetic_dir, "train", batch_size=4, world_size=2, rank=2)
    with pytest.raises(DataError, match="no split"):
        open_loader(synthetic_dir, "validation", batch_size=4)


def test_worker_with_unreadable_data_raises_instead_of_hanging(synthetic_copy):
    info = json.loads((synthetic_copy / "dataset.json").read_text())
    for shard in info["splits"]["test"]["shards"]:
        (synthetic_copy / shard["name"]).write_bytes(b"not a tar file" * 100)
    with pytest.raises(DataError, match="no readable sample"):
        list(open_loader(synthetic_copy, "test", batch_size=8, training=True))


def test_source_may_be_a_dataset_info_or_a_copied_tree(synthetic_dir, tmp_path):
    info = load_dataset_info(synthetic_dir)
    assert len(open_loader(info, "test", batch_size=10, training=False)) == 25
    moved = tmp_path / "moved"
    shutil.copytree(synthetic_dir, moved)  # shard names are relative to dataset.json
    assert load_dataset_info(moved).base_url == str(moved)
    loader = open_loader(moved, "test", batch_size=50, training=False)
    images = torch.cat([b.to("cpu").images for b in loader])
    assert images.shape[0] == 250 and np.isfinite(images.numpy()).all()


def test_two_ranks_with_two_workers_each_finish_together(synthetic_dir):
    counts = []
    for rank in range(2):
        loader = open_loader(
            synthetic_dir, "train", batch_size=16, rank=rank, world_size=2, loader_workers=2
        )
        counts.append((sum(1 for _ in loader), len(loader), loader.stats.batches))
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1] == counts[0][2]


def _rename_member(path, index: int, raw_name: bytes) -> None:
    """Give member `index` of a shard written by TarWriter (2 blocks a member here) a raw name."""
    data = bytearray(path.read_bytes())
    at = index * 2 * 512
    header = data[at : at + 512]
    header[0:100] = raw_name.ljust(100, b"\0")
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    data[at : at + 512] = header
    path.write_bytes(bytes(data))


def test_member_names_not_utf8_are_bad_samples_not_a_crash(synthetic_copy, layout):
    path = synthetic_copy / "test-000001.tar"
    with open(path, "rb") as f:
        keys = [key for key, _ in iter_samples(f)]
    bad_key = b"\xff" + keys[7][1:].encode()
    _rename_member(path, 2 * 7, bad_key + b".img.u8")  # both members of sample 7: its key
    _rename_member(path, 2 * 7 + 1, bad_key + b".cls")
    _rename_member(path, 2 * 9 + 1, keys[9].encode() + b".cl\xe9")  # sample 9's label field
    for workers in (0, 2):
        loader = open_loader(
            synthetic_copy, "test", batch_size=64, training=False, loader_workers=workers
        )
        assert sum(len(b) for b in loader) == layout["test"] - 2
        stats = loader.stats
        assert stats.skipped_bad_name == stats.samples_skipped == 2 and stats.bad_shards == 0
    with pytest.raises(DataError, match=r"test-000001\.tar: sample b'\\xff.*not UTF-8"):
        list(open_loader(synthetic_copy, "test", batch_size=64, training=False, on_error="raise"))


# --- check_splits: everything a run reads, checked before it starts -------------------------


def test_check_splits_passes_and_returns_the_info(synthetic_dir):
    data = DataConfig(shards=str(synthetic_dir), verify_checksums=True)
    info = check_splits(data, batch_size=64, world_size=2)
    assert info == load_dataset_info(synthetic_dir)
    assert check_splits(data, info, ("test", "train"), batch_size=8, world_size=4) is info


def test_check_splits_names_a_missing_split_and_the_available_ones(synthetic_dir):
    data = DataConfig(shards=str(synthetic_dir), eval_split="validation")
    with pytest.raises(DataError) as err:
        check_splits(data, batch_size=8, world_size=2)
    message = str(err.value)
    assert "data.eval_split is 'validation'" in message and "available: test, train" in message
    assert "dataset.json" in message and "fewer ranks" not in message
    check_splits(data, splits=("train", None), batch_size=8)  # None: not checked


def test_check_splits_rejects_splits_too_small_for_the_ranks(synthetic_dir, layout):
    data = DataConfig(shards=str(synthetic_dir))
    with pytest.raises(DataError) as err:
        check_splits(data, batch_size=layout["train"] // 2, world_size=3)
    assert "data.train_split: split 'train'" in str(err.value)
    assert "one full batch" in str(err.value) and "data.eval_split" not in str(err.value)
    with pytest.raises(DataError, match=r"data\.eval_split: split 'test'.*at least one sample"):
        check_splits(data, batch_size=1, world_size=layout["test"] + 1, splits=(None, "test"))


def test_check_splits_rejects_an_empty_split(synthetic_copy):
    path = synthetic_copy / "dataset.json"
    raw = json.loads(path.read_text())
    raw["splits"]["empty"] = {"num_samples": 0, "shards": []}
    path.write_text(json.dumps(raw))
    data = DataConfig(shards=str(synthetic_copy), eval_split="empty")
    with pytest.raises(DataError, match=r"data\.eval_split: split 'empty' .* is empty"):
        check_splits(data, batch_size=8)


def test_check_splits_checks_shards_and_checksums_of_every_split(synthetic_copy):
    for name in ("train-000003.tar", "test-000002.tar"):
        path = synthetic_copy / name
        data = bytearray(path.read_bytes())
        data[600] ^= 0xFF  # a pixel: invisible to the tar parser
        path.write_bytes(bytes(data))
    config = DataConfig(shards=str(synthetic_copy))
    check_splits(config, batch_size=8)  # checksums only on request
    with pytest.raises(DataError, match=r"checksum.*train-000003\.tar.*test-000002\.tar"):
        check_splits(config.model_copy(update={"verify_checksums": True}), batch_size=8)
    (synthetic_copy / "train-000001.tar").unlink()
    (synthetic_copy / "test-000000.tar").unlink()
    with pytest.raises(MissingDataError, match=r"train-000001\.tar.*test-000000\.tar"):
        check_splits(config, batch_size=8)
