"""RunStorage against a local moto S3 server (127.0.0.1 only; no Ray)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from capscore import build_model
from pipeline.config import load_config
from pipeline.train.checkpoint import CheckpointIndex, TrainState, checkpoint_name
from pipeline.train.outputs import RunLog
from pipeline.train.resume import write_config
from pipeline.train.storage import RAY_ENTRIES, RunStorage, StorageError, _explain

pytestmark = pytest.mark.slow  # a real S3 endpoint (moto's server) on loopback

BUCKET = "capsnet-test"  # the `s3` fixture (conftest.py) creates and empties it
RUN = "tiny"
LOCAL_RUN = RAY_ENTRIES[1:]
"""What a --local run's storage ignores: it pushes its own checkpoint_epoch-* folders."""
LAST = f"{checkpoint_name(2)}/checkpoint.pt"


def fake_run(root: Path) -> Path:
    """A run folder of two epochs as rank 0 writes one, by the real writers: config.yaml,
    metrics.jsonl + TensorBoard events, two checkpoint folders and their index, a log."""
    cfg = load_config(None, ["model.preset=tiny", f"run.name={RUN}", "run.num_workers=1"])
    cfg = cfg.for_data((1, 12, 12), 10)
    write_config(cfg, root)
    state = TrainState.create(build_model(cfg.model), cfg.train, torch.device("cpu"))
    log = RunLog(root, enabled=True, report_to=["tensorboard"], name=RUN, config=cfg.to_dict())
    index = CheckpointIndex.load(root)
    for epoch, accuracy in ((1, 0.5), (2, 0.6)):
        metrics = {"epoch": epoch, "test_accuracy": accuracy}
        state.next_epoch = epoch
        state.save(root / checkpoint_name(epoch), run_config=cfg.to_dict(), metrics=metrics)
        log.epoch(metrics)
        index.add(checkpoint_name(epoch), epoch, accuracy, keep=2)
    index.save(root)
    log.close()
    (root / "log.txt").write_bytes(b"epoch 1\nepoch 2\n")
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def bucket_tree(client, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):  # directory markers
                body = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
                out[obj["Key"][len(prefix) :]] = body
    return out


def test_push_changed_files_then_pull_the_same_tree(s3, tmp_path):
    local = fake_run(tmp_path / "staging")
    storage = RunStorage(f"s3://{BUCKET}/runs", RUN, local, ignore=LOCAL_RUN)
    assert storage.remote and storage.uri == f"s3://{BUCKET}/runs/{RUN}"
    storage.check()
    assert storage.pull().files == []  # a fresh run: nothing to resume from

    first = storage.push()
    assert first.ok and sorted(first.files) == sorted(tree(local))
    # the checkpoints after everything else, their index last
    assert first.files[-3:] == [f"{checkpoint_name(1)}/checkpoint.pt", LAST, "checkpoints.json"]
    assert first.bytes == sum(len(b) for b in tree(local).values())
    assert bucket_tree(s3, f"runs/{RUN}/") == tree(local)
    assert storage.exists(LAST) and not storage.exists("nope.txt")

    assert storage.push().files == []  # nothing changed: nothing uploaded
    with open(local / "metrics.jsonl", "ab") as f:
        f.write(b'{"epoch": 3, "test_accuracy": 0.7}\n')
    size = (local / LAST).stat().st_size
    (local / LAST).write_bytes(os.urandom(size))  # same size, new content
    second = storage.push()
    assert second.files == ["metrics.jsonl", LAST]
    assert bucket_tree(s3, f"runs/{RUN}/") == tree(local)
    only = storage.push(["log.txt"], force=True)
    assert only.files == ["log.txt"]

    # A rerun elsewhere: an empty staging folder gets the bucket's tree, and pulled files
    # don't go back up.
    again = RunStorage(f"s3://{BUCKET}/runs/", RUN, tmp_path / "elsewhere", ignore=LOCAL_RUN)
    pulled = again.pull()
    assert sorted(pulled.files) == sorted(tree(local))
    assert tree(tmp_path / "elsewhere") == tree(local)
    assert again.push().files == []
    assert not list((tmp_path / "elsewhere").rglob("*partial*"))


def test_ray_entries_are_neither_pushed_nor_pulled(s3, tmp_path):
    local = fake_run(tmp_path / "staging")
    (local / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    (local / "checkpoint_2026-01-01_00-00-00.000000" / "checkpoint.pt").write_bytes(b"ray")
    storage = RunStorage(f"s3://{BUCKET}/runs", RUN, local)
    assert not any(f.startswith("checkpoint_") for f in storage.push().files)
    for key in ("checkpoint_manager_snapshot.json", ".validate_storage_marker", "checkpoint_x/a"):
        s3.put_object(Bucket=BUCKET, Key=f"runs/{RUN}/{key}", Body=b"ray's")
    (local / "stale.txt").write_text("not in the bucket")
    pulled = storage.pull(mirror=True)
    assert not any(f.startswith(("checkpoint_", ".validate")) for f in pulled.files)
    assert not (local / "stale.txt").exists()
    assert (local / "checkpoint_2026-01-01_00-00-00.000000" / "checkpoint.pt").exists()


class SpyFS:
    """Wraps a pyarrow filesystem: records writes and moves, and can fail writes."""

    def __init__(self, fs):
        self.fs, self.writes, self.moves, self.fail_after = fs, [], [], None

    def open_output_stream(self, path, *args, **kwargs):
        if self.fail_after is not None and len(self.writes) >= self.fail_after:
            raise OSError(f"When uploading '{path}': AWS Error NETWORK_CONNECTION: curlCode: 7")
        self.writes.append(path)
        return self.fs.open_output_stream(path, *args, **kwargs)

    def move(self, src, dest):
        self.moves.append((src, dest))
        return self.fs.move(src, dest)

    def __getattr__(self, name):
        return getattr(self.fs, name)


def spy_on(storage: RunStorage) -> SpyFS:
    storage._fs = spy = SpyFS(storage._fs)
    return spy


def test_large_files_go_through_a_temporary_key(s3, tmp_path):
    local = fake_run(tmp_path / "staging")
    storage = RunStorage(f"s3://{BUCKET}/runs", RUN, local, ignore=LOCAL_RUN, buffer_limit=1000)
    spy = spy_on(storage)
    assert storage.push().ok
    big = {rel for rel, data in tree(local).items() if len(data) > 1000}
    assert {dest.removeprefix(f"{BUCKET}/runs/{RUN}/") for _, dest in spy.moves} == big
    assert all(".capsnet-partial-" in src for src, _ in spy.moves)
    assert bucket_tree(s3, f"runs/{RUN}/") == tree(local)  # no .capsnet-partial-* left over


def test_missing_bucket_is_a_clear_error(s3, tmp_path, caplog):
    local = fake_run(tmp_path / "staging")
    storage = RunStorage("s3://no-such-bucket/runs", RUN, local)
    for call in (storage.check, storage.pull):
        with pytest.raises(StorageError, match=r"s3://no-such-bucket/runs/tiny.*does not exist"):
            call()
    # During training: a warning, the run goes on, and the files are retried next time.
    with caplog.at_level(logging.WARNING, logger="pipeline.train.storage"):
        result = storage.push()
    assert not result.ok and result.files == [] and "does not exist" in result.error
    assert "push failed" in caplog.text and "Traceback" not in caplog.text
    # The end of the run: raises, naming the URI and the endpoint it used.
    with pytest.raises(StorageError) as info:
        storage.push(strict=True)
    message = str(info.value)
    assert "s3://no-such-bucket/runs/tiny/" in message and "AWS_ENDPOINT_URL" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_failed_push_is_retried_next_time(s3, tmp_path):
    local = fake_run(tmp_path / "staging")
    storage = RunStorage(f"s3://{BUCKET}/runs", RUN, local, ignore=LOCAL_RUN)
    spy = spy_on(storage)
    spy.fail_after = 3  # the store goes away after three files
    broken = storage.push()
    assert (
        len(broken.files) == 3
        and "unreachable" in broken.error
        and "4 file(s) left" in broken.error
    )
    spy.fail_after = None
    retried = storage.push()
    assert retried.ok and sorted(broken.files + retried.files) == sorted(tree(local))
    assert len(spy.writes) == len(tree(local))  # each file written once
    assert bucket_tree(s3, f"runs/{RUN}/") == tree(local)


def test_credential_errors_say_what_to_set():
    denied = OSError(
        "When getting information for key 'runs/tiny' in bucket 'b': AWS Error ACCESS_DENIED "
        "during HeadObject operation: No response body."
    )
    msg = _explain(denied, "look up", "s3://b/runs/tiny")
    assert msg.startswith("cannot look up s3://b/runs/tiny: access denied or no credentials")
    assert "AWS_ACCESS_KEY_ID" in msg and "ACCESS_DENIED" in msg
    unknown = OSError("AWS Error UNKNOWN (HTTP status 403) during HeadObject operation: No body")
    assert "no credentials" in _explain(unknown, "look up", "s3://b/runs/tiny")
    down = OSError(
        "When initiating multiple part upload for key 'k' in bucket 'b': AWS Error "
        "NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 7, Could not "
        "connect to server; Details: Failed to connect to 127.0.0.1:40361 after 0 ms"
    )
    assert "endpoint is unreachable" in _explain(down, "upload to", "s3://b/k")
    gcs = _explain(OSError("google::cloud::Status(PERMISSION_DENIED: ...)"), "upload to", "gs://b")
    assert "GOOGLE_APPLICATION_CREDENTIALS" in gcs


def test_unknown_scheme_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match=r"cannot open nope://x.*no filesystem"):
        RunStorage("nope://x", RUN, tmp_path)


def test_local_storage_is_a_no_op(tmp_path):
    run_dir = fake_run(tmp_path / "runs" / RUN)
    storage = RunStorage(str(tmp_path / "runs"), RUN, run_dir)
    before = tree(run_dir)
    assert not storage.remote and storage.uri == str(run_dir)
    storage.check()
    assert storage.push(strict=True).files == [] and storage.pull(mirror=True).files == []
    assert storage.exists(LAST) and not storage.exists("nope")
    assert tree(run_dir) == before
    assert not RunStorage(f"file://{tmp_path}/runs", RUN, run_dir).remote
