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
