"""Run integrity without servers (issue 19): the keep rule against Ray's own, resume on I/O
errors, metrics.jsonl with a torn last line, fatal.json, temp folders."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from pipeline.train.checkpoint import CheckpointIndex, checkpoint_name

NAN = math.nan

# score sequences (one test accuracy per epoch) x keep: ties, NaN, falls and rises
SEQUENCES = [
    [0.9, 0.9, 0.8],
    [0.9, 0.9, 0.9, 0.9],
    [0.5, 0.7, 0.7, 0.6, 0.7],
    [0.8, 0.7, 0.6, 0.5],
    [0.1, 0.2, 0.3, 0.4],
    [0.9, NAN, 0.9, NAN, 0.2],
    [NAN, NAN, 0.1],
    [0.3, 0.3, 0.5, 0.5, 0.3, 0.5],
]


def _ray_kept(accuracies: list[float], keep: int, root: Path) -> tuple[set[str], str]:
    """The folders Ray Train's own checkpoint manager keeps (and its best) for these scores,
    run without starting Ray: CheckpointConfig(num_to_keep=keep, score test_accuracy max)."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    config = CheckpointConfig(
        num_to_keep=keep, checkpoint_score_attribute="test_accuracy", checkpoint_score_order="max"
    )
    manager = _CheckpointManager(config)
    for epoch, accuracy in enumerate(accuracies, start=1):
        folder = root / checkpoint_name(epoch)
        folder.mkdir(parents=True)  # the manager deletes the ones it drops
        manager.register_checkpoint(
            _TrainingResult(
                checkpoint=Checkpoint.from_directory(str(folder)),
                metrics={"test_accuracy": accuracy, "epoch": epoch},
            )
        )
    kept = {p.name for p in root.iterdir()}
    best = Path(manager.best_checkpoint_result.checkpoint.path).name
    return kept, best


@pytest.mark.parametrize("keep", [1, 2, 3])
@pytest.mark.parametrize("accuracies", SEQUENCES, ids=str)
def test_keep_rule_matches_rays(accuracies: list[float], keep: int, tmp_path: Path) -> None:
    index = CheckpointIndex(entries={})
    for epoch, accuracy in enumerate(accuracies, start=1):
        index.add(checkpoint_name(epoch), epoch, accuracy, keep=keep)
    kept, best = _ray_kept(accuracies, keep, tmp_path)
    assert set(index.entries) == kept
    assert index.best == best
    assert index.last == checkpoint_name(len(accuracies))


def test_keep_one_tie_names_the_newer_best() -> None:
    """The issue's case: .9, .9, .8 with keep=1 — Ray keeps epoch 2 (newer wins a tie) and 3."""
    index = CheckpointIndex(entries={})
    for epoch, accuracy in enumerate([0.9, 0.9, 0.8], start=1):
        index.add(checkpoint_name(epoch), epoch, accuracy, keep=1)
    assert index.best == checkpoint_name(2)
    assert set(index.entries) == {checkpoint_name(2), checkpoint_name(3)}


# --- resume: only a corrupt checkpoint is skipped, an I/O error fails --------------------------


def _run_with_two_checkpoints(run_dir: Path, shards: Path) -> Path:
    """A run folder with checkpoints after epochs 1 and 2 (the real writer); returns epoch 2's."""
    import torch

    from capscore import build_model
    from pipeline.config import load_config
    from pipeline.data import load_dataset_info
    from pipeline.train.checkpoint import TrainState

    cfg = load_config(None, ["model.preset=tiny", f"data.shards={shards}"])
    info = load_dataset_info(shards)
    cfg = cfg.for_data(info.image_shape, info.num_classes)
    state = TrainState.create(build_model(cfg.model), cfg.train, torch.device("cpu"))
    for epoch in (1, 2):
        state.next_epoch = epoch
        path = state.save(run_dir / checkpoint_name(epoch), run_config={}, metrics={})
    return path


def test_truncated_newest_checkpoint_is_skipped(tmp_path: Path, tiny_shards, capsys) -> None:
    from pipeline.train.context import LocalContext
    from pipeline.train.loop import _newest_checkpoint

    newest = _run_with_two_checkpoints(tmp_path, tiny_shards)
    newest.write_bytes(newest.read_bytes()[:100])  # a kill mid-write of a copy
    path, ckpt = _newest_checkpoint(LocalContext(tmp_path), tmp_path, cfg=None)
    assert ckpt["next_epoch"] == 1
    assert f"skipping checkpoint {newest}" in capsys.readouterr().out


@pytest.mark.parametrize("error", [PermissionError(13, "denied"), OSError(5, "I/O error")])
def test_io_error_on_newest_checkpoint_fails(
    tmp_path: Path, tiny_shards, monkeypatch, error
) -> None:
    """An OSError is the storage's, not the file's: resuming from an older checkpoint would
    drop the later epochs' metrics and overwrite their folders."""
    import pipeline.train.checkpoint as checkpoint
    from pipeline.train.context import LocalContext
    from pipeline.train.loop import _newest_checkpoint

    newest = _run_with_two_checkpoints(tmp_path, tiny_shards)
    real_load = checkpoint.torch.load

    def load(path, *args, **kwargs):
        if Path(path) == newest:
            raise error
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", load)
    with pytest.raises(OSError, match=re.escape(str(newest))) as raised:
        _newest_checkpoint(LocalContext(tmp_path), tmp_path, cfg=None)
    assert type(raised.value) is type(error)


# --- submit: the token stays with the host it was meant for -----------------------------------


def _serve(handler_for) -> tuple[str, object]:
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), handler_for)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def test_reachability_probe_does_not_carry_the_token_over_a_redirect() -> None:
    """urllib copies `add_header` headers onto a redirect, also to another host: the probe's
    token goes to the cluster it asked, not to where that cluster's answer points."""
    import http.server

    from pipeline.submit import check_reachable

    seen: dict[str, dict[str, str]] = {}

    class Record(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen[self.path] = dict(self.headers)
            body = b'{"ray_version": "9.9.9"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    other, other_server = _serve(Record)

    class Redirect(Record):
        def do_GET(self):
            seen["first"] = dict(self.headers)
            self.send_response(302)
            self.send_header("Location", f"{other}/api/version")
            self.end_headers()

    first, first_server = _serve(Redirect)
    try:
        check_reachable(first, {"RAY_AUTH_TOKEN": "s3cr3t", "HOME": "/nonexistent"}, 5.0)
    finally:
        first_server.shutdown()
        other_server.shutdown()
    assert seen["first"].get("Authorization") == "Bearer s3cr3t"  # the cluster asked gets it
    assert "/api/version" in seen  # the redirect was followed
    assert not any("s3cr3t" in v for v in seen["/api/version"].values())


# --- run-folder files a kill can tear ---------------------------------------------------------


def test_torn_last_metrics_row_is_dropped_with_a_warning(tmp_path: Path, capsys) -> None:
    from pipeline.train.outputs import RunLog, read_metrics

    rows = [{"epoch": 1, "test_accuracy": 0.5}, {"epoch": 2, "test_accuracy": 0.6}]
    log = RunLog(tmp_path, enabled=True, report_to=[], name="tiny", config={})
    for row in rows:
        log.epoch(row)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "test_acc')  # a kill in the middle of the third row's write
    assert read_metrics(tmp_path) == rows
    assert "metrics.jsonl" in capsys.readouterr().out
    log = RunLog(tmp_path, enabled=True, report_to=[], name="tiny", config={})
    log.resume(2, rows[-1])  # the resume rewrites the file without the torn row
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")
    assert read_metrics(tmp_path) == rows


def test_bad_metrics_row_before_the_last_is_an_error_naming_the_line(tmp_path: Path) -> None:
    """Only the last line can be torn by a kill: a bad row before it is real damage."""
    from pipeline.train.outputs import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl.* line 2"):
        read_metrics(tmp_path)


def test_resume_after_a_torn_metrics_row_trains_on(tiny_shards, tiny_config, tmp_path) -> None:
    from pipeline.train.loop import run_dir_for
    from pipeline.train.outputs import read_metrics
    from pipeline.train.trainer import train

    first = tiny_config(tiny_shards, tmp_path, "train.epochs=1")
    train(first, local=True)
    with open(run_dir_for(first) / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "steps')
    train(tiny_config(tiny_shards, tmp_path), local=True)
    assert [r["epoch"] for r in read_metrics(run_dir_for(first))] == [1, 2]


def test_fatal_json_is_written_atomically(tmp_path: Path, monkeypatch) -> None:
    """A write that dies half-way leaves the previous fatal.json (or none), never half one."""
    from pipeline.train.context import FATAL_FILE, read_fatal, write_fatal

    write_fatal(tmp_path, ValueError("the first"))
    real_write_text = Path.write_text

    def dies_half_way(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", dies_half_way)
    with pytest.raises(OSError):
        write_fatal(tmp_path, RuntimeError("the second"))
    monkeypatch.undo()
    assert read_fatal(tmp_path) == "ValueError: the first"
    assert [p.name for p in tmp_path.iterdir()] == [FATAL_FILE]


def test_downloaded_resume_checkpoint_is_removed_after_loading(
    tmp_path: Path, tiny_shards, monkeypatch
) -> None:
    """Ray's checkpoint on object storage is downloaded to a capsnet-resume-* temp folder to
    be read: once read, it is removed (each resume of a long run would leave one more)."""
    import shutil
    import tempfile
    from types import SimpleNamespace

    from pipeline.train.context import RayContext
    from pipeline.train.loop import _newest_checkpoint

    source = _run_with_two_checkpoints(tmp_path / "bucket", tiny_shards).parent
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    class RemoteCheckpoint:  # what ray.train.get_checkpoint() returns for s3:// storage
        filesystem = SimpleNamespace(type_name="s3")

        def to_directory(self, path: str) -> None:
            shutil.copytree(source, path, dirs_exist_ok=True)

    ctx = object.__new__(RayContext)  # no Ray: only get_checkpoint is used
    ctx._train = SimpleNamespace(get_checkpoint=RemoteCheckpoint)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _, ckpt = _newest_checkpoint(ctx, run_dir, cfg=None)
    assert ckpt["next_epoch"] == 2
    assert not list(temp.glob("capsnet-resume-*"))
