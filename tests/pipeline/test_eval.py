"""capsnet eval: outputs named after the checkpoint's folder, a clear error for a device this
machine does not have, corrupt shards (an error unless --on-error skip --allow-partial, and
then the accuracy says over how many samples), and shards that do not fit the checkpoint
(fast tier: an untrained tiny checkpoint, no Ray)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from capscore import build_model
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data import ShardsConfig, load_dataset_info, write_shards
from pipeline.evaluate import resolve_device
from pipeline.train.checkpoint import CheckpointIndex, TrainState, checkpoint_name

SAMPLE_BYTES = 4 * 512  # a 12x12 sample in a shard: header + image block + header + label block


def save_run(run, shards, accuracies=(0.9, 0.5)):
    """A run folder as training writes it, by the real writers: one checkpoint folder per
    epoch of an untrained tiny CapsNet (test accuracy as given: by default epoch 1 is the best,
    epoch 2 the last) and the index that names them."""
    cfg = load_config(None, ["model.preset=tiny", f"data.shards={shards}"])
    info = load_dataset_info(shards)
    cfg = cfg.for_data(info.image_shape, info.num_classes)
    state = TrainState.create(build_model(cfg.model), cfg.train, torch.device("cpu"))
    index = CheckpointIndex.load(run)
    for epoch, accuracy in enumerate(accuracies, start=1):
        state.next_epoch = epoch
        metrics = {"epoch": epoch, "test_accuracy": accuracy}
        state.save(run / checkpoint_name(epoch), run_config=cfg.to_dict(), metrics=metrics)
        index.add(checkpoint_name(epoch), epoch, accuracy, keep=len(accuracies))
    index.save(run)
    return run


def folder(run, which="best"):
    """The checkpoint folder the run's index names as `which` (best or last)."""
    return run / getattr(CheckpointIndex.load(run), which)


def synthetic(out, **kw):
    """Tiny synthetic shards: 12x12, 10 classes, 80 test samples in shards of 50 and 30."""
    settings = dict(image_size=12, train_samples=16, test_samples=80, shard_size=50, seed=2)
    write_shards(ShardsConfig(dataset="synthetic", out=str(out), **{**settings, **kw}))
    return out


@pytest.fixture(scope="module")
def run_dir(tiny_shards, tmp_path_factory):
    """runs/tiny/ with two checkpoints of an untrained tiny CapsNet (best: epoch 1, last: 2)."""
    return save_run(tmp_path_factory.mktemp("eval") / "tiny", tiny_shards)


@pytest.fixture
def corrupt_copy(tiny_shards, tmp_path):
    """A copy of the tiny shards whose test-000000.tar (50 of the 80 test samples) ends after
    10 samples."""
    copy = tmp_path / "corrupt"
    shutil.copytree(tiny_shards, copy)
    path = copy / "test-000000.tar"
    path.write_bytes(path.read_bytes()[: 10 * SAMPLE_BYTES + 700])
    return copy


def eval_args(checkpoint, shards, *extra):
    return [
        *("eval", "--checkpoint", str(checkpoint), "--shards", str(shards)),
        *("--loader-workers", "0", "--batch-size", "32", *extra),
    ]


@pytest.mark.parametrize(
    "which, given", [("best", "folder"), ("last", "checkpoint.pt"), ("best", "RUN/best")]
)
def test_outputs_beside_the_checkpoint(run_dir, tiny_shards, capsys, which, given):
    where = folder(run_dir, which)
    name = where.name
    checkpoint = {"folder": where, "checkpoint.pt": where / "checkpoint.pt"}.get(
        given, run_dir / which
    )
    assert main(eval_args(checkpoint, tiny_shards)) == 0
    out = capsys.readouterr().out
    json_path, png = where / f"eval-{name}-test.json", where / f"confusion-{name}-test.png"
    assert f"metrics: {json_path}" in out and f"confusion matrix: {png}" in out
    report = json.loads(json_path.read_text())
    assert report["checkpoint"] == str((where / "checkpoint.pt").resolve())
    assert report["shards"] == str(tiny_shards.resolve())
    assert (report["split"], report["samples"]) == ("test", 80)
    assert (report["samples_expected"], report["samples_unreadable"], report["complete"]) == (
        80,
        0,
        True,
    )
    assert re.search(r"^accuracy [0-9.]+  error [0-9.]+%  over 80 of 80 samples$", out, re.M)
    assert report["accuracy"] + report["error"] == pytest.approx(1.0)
    assert len(report["per_class_accuracy"]) == len(report["confusion"]) == 10
    assert sum(map(sum, report["confusion"])) == 80
    assert {"margin", "reconstruction"} <= set(report["losses"])
    assert png.stat().st_size > 1000
    # each checkpoint's outputs in its own folder: none shared (and overwritten) in the run's
    assert not list(run_dir.glob("*.png")) and not list(run_dir.glob("eval-*.json"))


def test_out_folder(run_dir, tiny_shards, tmp_path):
    best = folder(run_dir)
    assert main(eval_args(best, tiny_shards, "--out", str(tmp_path / "o"), "--split", "train")) == 0
    assert (tmp_path / "o" / f"eval-{best.name}-train.json").is_file()
    assert (tmp_path / "o" / f"confusion-{best.name}-train.png").is_file()


@pytest.mark.parametrize(
    "device, gpus",
    [("cuda", 0), ("cuda:5", 2), ("gpu0", 0), ("cuda:x", 2)],
)
def test_unavailable_device_is_one_line_exit_2(
    run_dir, tiny_shards, monkeypatch, capsys, device, gpus
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert main(eval_args(folder(run_dir), tiny_shards, "--device", device)) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        f"capsnet eval: error: --device {device}: not available here; available: auto, cpu"
        + "".join(f", {d}" for d in (["cuda", "cuda:0", "cuda:1"] if gpus else []))
    )
    assert "Traceback" not in err


def test_available_devices_resolve(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


# --- issue 11 item 7: corrupt shards --------------------------------------------------------


@pytest.mark.parametrize("workers", ["0", "2"])
def test_corrupt_shard_is_a_one_line_error_by_default(
    run_dir, corrupt_copy, capsys, tmp_path, workers
):
    out = tmp_path / "out"
    args = eval_args(folder(run_dir), corrupt_copy, "--out", str(out))
    assert main([*args, "--loader-workers", workers]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        f"capsnet eval: error: {corrupt_copy / 'test-000000.tar'}: truncated archive (no "
        "end-of-archive marker); to evaluate the readable samples only: --on-error skip "
        "--allow-partial"
    )
    assert "Traceback" not in err and not out.exists()


def test_skipping_without_allow_partial_is_an_error_naming_the_counts(
    run_dir, corrupt_copy, capsys, tmp_path
):
    out = tmp_path / "out"
    args = eval_args(folder(run_dir), corrupt_copy, "--out", str(out))
    assert main([*args, "--on-error", "skip"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-2].startswith(
        "capsnet eval: error: split 'test': read 40 of 80 samples (40 unreadable), so an "
        "accuracy would not be over the whole split; to report it over the readable samples "
        "only: --on-error skip --allow-partial"
    )
    assert not out.exists()


def test_allowed_partial_result_says_over_how_many(run_dir, corrupt_copy, capsys, tmp_path):
    best = folder(run_dir)
    args = eval_args(best, corrupt_copy, "--out", str(tmp_path), "--on-error", "skip")
    assert main([*args, "--allow-partial"]) == 0
    captured = capsys.readouterr()
    assert re.search(
        r"^accuracy [0-9.]+  error [0-9.]+%  over 40 of 80 samples \(40 "
        r"unreadable\)$",
        captured.out,
        re.M,
    )
    assert "warning: split 'test': accuracy over 40 of 80 samples (40 unreadable)" in (captured.err)
    report = json.loads((tmp_path / f"eval-{best.name}-test.json").read_text())
    assert (report["samples"], report["samples_expected"]) == (40, 80)
    assert (report["samples_unreadable"], report["complete"]) == (40, False)
    assert report["samples_skipped"] == 40 and sum(map(sum, report["confusion"])) == 40


def test_unreadable_split_is_an_error_even_with_allow_partial(
    run_dir, tiny_shards, capsys, tmp_path
):
    shards = tmp_path / "garbage"
    shutil.copytree(tiny_shards, shards)
    for path in shards.glob("test-*.tar"):
        path.write_bytes(b"not a tar file" * 100)
    args = eval_args(folder(run_dir), shards, "--out", str(tmp_path / "o"))
    assert main([*args, "--on-error", "skip", "--allow-partial"]) == 2
    err = capsys.readouterr().err
    assert "capsnet eval: error: split 'test': none of its 80 samples could be read" in err
    assert not (tmp_path / "o").exists()


def test_verify_checksums(run_dir, tiny_shards, capsys, tmp_path):
    shards = tmp_path / "flipped"
    shutil.copytree(tiny_shards, shards)
    path = shards / "test-000001.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # a pixel: invisible to the tar parser
    path.write_bytes(bytes(data))
    args = eval_args(folder(run_dir), shards, "--out", str(tmp_path / "o"))
    assert main(args) == 0  # unverified: the pixel is read as it is
    capsys.readouterr()
    assert main([*args, "--verify-checksums"]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "test-000001.tar" in err


# --- issue 11 item 8: shards that do not fit the checkpoint ---------------------------------


@pytest.mark.parametrize(
    "kw, theirs",
    [
        (dict(image_size=16), "1x16x16 and 10"),
        (dict(num_classes=5), "1x12x12 and 5"),
        (dict(channels=3), "3x12x12 and 10"),
    ],
)
def test_shards_that_do_not_fit_are_refused_before_reading(run_dir, capsys, tmp_path, kw, theirs):
    shards = synthetic(tmp_path / "other", **kw)
    args = eval_args(folder(run_dir), shards, "--out", str(tmp_path / "o"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        f"capsnet eval: error: checkpoint expects 1x12x12 images and 10 classes; {shards} has "
        f"{theirs}"
    )
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_single_label_checkpoint_on_multi_hot_shards_is_refused(run_dir, capsys, tmp_path):
    shards = synthetic(tmp_path / "multi", multi_hot=True)
    assert main(eval_args(folder(run_dir), shards)) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith(
        f"capsnet eval: error: checkpoint was trained on single-label data; {shards} has "
        "multi-hot labels"
    )


def test_multi_hot_checkpoint_on_multi_hot_shards(capsys, tmp_path):
    shards = synthetic(tmp_path / "multi", multi_hot=True)
    run = save_run(tmp_path / "run", shards, accuracies=(0.5,))
    best = folder(run)
    assert main(eval_args(best, shards)) == 0
    out = capsys.readouterr().out
    assert "over 80 of 80 samples" in out and "multi-label" in out
    report = json.loads((best / f"eval-{best.name}-test.json").read_text())
    assert report["label_kind"] == "multi-hot" and report["complete"]
    assert report["confusion"] is None and report["per_class_accuracy"] is None
    assert not list(best.glob("*.png"))


def test_empty_checkpoint_is_one_line_exit_2(tiny_shards, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "" must not quietly mean the current folder
    assert main(eval_args("", tiny_shards)) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        "capsnet eval: error: --checkpoint: empty; give a checkpoint.pt, its folder, or a run "
        "folder"
    )
    assert "Traceback" not in err and err.count("error:") == 1
