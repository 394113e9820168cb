"""Run integrity against a local moto S3 server (issue 19): what a bucket may make a pull write,
and a staging folder that belongs to one storage URI and run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.train.storage import RunStorage, StorageError

pytestmark = pytest.mark.slow  # a real S3 endpoint (moto's server) on loopback

BUCKET = "capsnet-test"  # the `s3` fixture (conftest.py) creates and empties it


@pytest.mark.parametrize(
    "key", ["runs/tiny/../escape.txt", "runs/tiny/sub/../../escape.txt", "runs/tiny//escape.txt"]
)
def test_pull_refuses_keys_that_leave_the_run_folder(s3, tmp_path: Path, key: str) -> None:
    """A key with `../` (or an absolute path after the prefix) must not write outside the run
    folder on rank 0's node: the pull fails naming the key, and writes nothing."""
    s3.put_object(Bucket=BUCKET, Key="runs/tiny/metrics.jsonl", Body=b'{"epoch": 1}\n')
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"outside\n")
    # Some clients normalise the path of a GET (AWS's C++ SDK, under pyarrow, does): then the
    # key's download fetches this object, which a pull must not write outside the folder.
    s3.put_object(Bucket=BUCKET, Key="runs/escape.txt", Body=b"outside\n")
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert key in listed  # stored as given, not normalised by the server
    local = tmp_path / "stage" / "tiny"
    storage = RunStorage(f"s3://{BUCKET}/runs", "tiny", local)
    with pytest.raises(StorageError, match=re.escape(f"'{key.removeprefix('runs/tiny/')}'")):
        storage.pull()
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert not any("escape" in p for p in written), written
    assert not Path("/escape.txt").exists()


# --- the staging folder: one per storage URI and run, and the bucket is the truth at start ----


def _epochs(client, prefix: str) -> list[int]:
    import json

    body = client.get_object(Bucket=BUCKET, Key=f"{prefix}metrics.jsonl")["Body"].read()
    return [json.loads(line)["epoch"] for line in body.decode().splitlines() if line.strip()]


def _keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix) :] for page in pages for o in page.get("Contents", [])}


def _empty(client, prefix: str) -> None:
    for key in _keys(client, prefix):
        client.delete_object(Bucket=BUCKET, Key=prefix + key)


def test_same_run_name_on_another_bucket_prefix_trains(s3, tiny_shards, tiny_config, tmp_path):
    """Issue 19 item 1: 2 epochs to s3://B/a as X, then 1 epoch to an empty s3://B/b as X
    used to read a's checkpoints.json from the shared staging folder and be planned finished:
    nothing trained, no metrics in b."""
    import shutil
    import uuid

    from pipeline.train.loop import run_dir_for
    from pipeline.train.trainer import train

    name = f"X-{uuid.uuid4().hex[:8]}"
    first = tiny_config(
        tiny_shards, tmp_path, f"run.storage_path=s3://{BUCKET}/a", f"run.name={name}"
    )
    second = tiny_config(
        tiny_shards,
        tmp_path,
        f"run.storage_path=s3://{BUCKET}/b",
        f"run.name={name}",
        "train.epochs=1",
    )
    try:
        train(first, local=True)
        assert _epochs(s3, f"a/{name}/") == [1, 2]
        summary = train(second, local=True)
        assert _epochs(s3, f"b/{name}/") == [1]
        assert "checkpoint_epoch-0001/checkpoint.pt" in _keys(s3, f"b/{name}/")
        assert "checkpoint_epoch-0002/checkpoint.pt" not in _keys(s3, f"b/{name}/")
        assert summary.epochs == 1
        assert run_dir_for(first) != run_dir_for(second)
    finally:
        shutil.rmtree(run_dir_for(first), ignore_errors=True)
        shutil.rmtree(run_dir_for(second), ignore_errors=True)


def test_emptied_bucket_wins_over_the_staging_folder(s3, tiny_shards, tiny_config, tmp_path):
    """The same URI and run, the bucket emptied since: the staging folder's files from before
    (index, metrics, checkpoints, log) must not make the run finished or leak into it."""
    import shutil
    import uuid

    from pipeline.train.loop import run_dir_for
    from pipeline.train.trainer import train

    name = f"X-{uuid.uuid4().hex[:8]}"
    storage = f"run.storage_path=s3://{BUCKET}/a"
    first = tiny_config(tiny_shards, tmp_path, storage, f"run.name={name}")
    again = tiny_config(tiny_shards, tmp_path, storage, f"run.name={name}", "train.epochs=1")
    try:
        train(first, local=True)
        _empty(s3, f"a/{name}/")
        summary = train(again, local=True)
        prefix = f"a/{name}/"
        assert _epochs(s3, prefix) == [1]
        keys = _keys(s3, prefix)
        assert "checkpoint_epoch-0001/checkpoint.pt" in keys
        assert not any(k.startswith("checkpoint_epoch-0002") for k in keys), sorted(keys)
        assert summary.epochs == 1
        log = s3.get_object(Bucket=BUCKET, Key=f"{prefix}log.txt")["Body"].read().decode()
        assert "epoch 2/" not in log, log  # the first run's log is not carried on
    finally:
        shutil.rmtree(run_dir_for(first), ignore_errors=True)


def test_mirror_pull_deletes_only_what_the_bucket_lacks(s3, tmp_path: Path) -> None:
    """With `only`, the bucket's other files are not downloaded but stay; Ray's entries
    (`ignore`) and `keep` stay; what the bucket lacks goes, with the folders it leaves empty."""
    for key in ("metrics.jsonl", "config.yaml", "tensorboard/events.1"):
        s3.put_object(Bucket=BUCKET, Key=f"runs/tiny/{key}", Body=b"bucket\n")
    local = tmp_path / "tiny"
    for rel in (
        "config.yaml",
        "tensorboard/events.1",
        "tensorboard/events.0",
        "figures/old/a.png",
        "checkpoints.json",
        "log.txt",
        "checkpoint_2026-01-01/checkpoint.pt",
    ):
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_text("stale\n")
    storage = RunStorage(f"s3://{BUCKET}/runs", "tiny", local)
    pulled = storage.pull(only=["metrics.jsonl", "checkpoints.json"], mirror=True, keep=["log.txt"])
    assert pulled.files == ["metrics.jsonl"]
    left = sorted(p.relative_to(local).as_posix() for p in local.rglob("*"))
    assert left == [
        "checkpoint_2026-01-01",
        "checkpoint_2026-01-01/checkpoint.pt",
        "config.yaml",
        "log.txt",
        "metrics.jsonl",
        "tensorboard",
        "tensorboard/events.1",
    ]
    assert (local / "config.yaml").read_text() == "stale\n"  # not in `only`: not downloaded
