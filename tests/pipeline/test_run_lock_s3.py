"""One writer per run on object storage (issue 19 item 4): the lease object, over moto's S3."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline.train.lock import Holder, RunLock, RunLockError
from pipeline.train.loop import run_dir_for
from pipeline.train.storage import LOCK_KEY, RunStorage
from pipeline.train.trainer import dry_run, train

pytestmark = pytest.mark.slow  # a real S3 endpoint (moto's server) on loopback

BUCKET = "capsnet-test"  # the `s3` fixture (conftest.py) creates and empties it
KEY = f"runs/tiny/{LOCK_KEY}"


@pytest.fixture
def storage(s3, tmp_path):
    return RunStorage(f"s3://{BUCKET}/runs", "tiny", tmp_path / "staging")


def lease(s3) -> Holder | None:
    try:
        body = s3.get_object(Bucket=BUCKET, Key=KEY)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return Holder.parse(body)


def put_lease(s3, pid: int, age_s: float) -> Holder:
    """A lease as another `capsnet train` leaves one, last refreshed age_s ago."""
    t = time.time() - age_s
    holder = Holder(socket.gethostname(), pid, t - 60, t)
    s3.put_object(Bucket=BUCKET, Key=KEY, Body=holder.encode())
    return holder


def test_the_last_writer_holds_the_lease(storage, s3):
    """Without a conditional create: a rival that looked before our write and wrote after it
    (within the settle time) holds the run, and we fail naming it."""
    lock = RunLock(storage, settle_s=0.3)
    real_write = storage.write
    rival = {}

    def write_then_rival_writes(rel, data):
        real_write(rel, data)
        rival["holder"] = put_lease(s3, 4242, age_s=0)

    storage.write = write_then_rival_writes
    with pytest.raises(RunLockError, match="pid 4242"):
        lock.acquire()
    assert lease(s3) == rival["holder"] and lock.held is None


def test_second_acquisition_fails_naming_the_holder(storage, s3):
    first, second = RunLock(storage, settle_s=0), RunLock(storage, settle_s=0)
    with first.hold() as me:
        assert lease(s3) == me
        with pytest.raises(RunLockError) as err:
            second.acquire()
        message = str(err.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in message
        assert f"s3://{BUCKET}/runs/tiny/{LOCK_KEY}" in message and "\n" not in message
        assert LOCK_KEY not in storage.pull().files  # the lease is never synced
    assert lease(s3) is None  # released


def test_stale_lease_is_taken_over_and_a_fresh_one_is_not(storage, s3, capsys):
    lock = RunLock(storage, stale_s=600, settle_s=0)
    put_lease(s3, 4242, age_s=60)
    with pytest.raises(RunLockError, match="pid 4242"):
        lock.acquire()
    put_lease(s3, 4242, age_s=3600)
    assert "would take over the stale lock" in lock.check()  # dry run: looks only
    assert lease(s3).pid == 4242
    with lock.hold() as me:
        assert lease(s3) == me
    assert "took over the stale lock" in capsys.readouterr().out
    assert lease(s3) is None


def test_the_holder_refreshes_its_lease(storage, s3):
    with RunLock(storage, refresh_s=0.2, settle_s=0).hold() as me:
        deadline = time.time() + 10
        while lease(s3).refreshed == me.refreshed and time.time() < deadline:
            time.sleep(0.1)
        now = lease(s3)
        assert now.token == me.token and now.since == me.since
        assert now.refreshed > me.refreshed
    assert lease(s3) is None


def test_train_fails_fast_while_another_run_holds_the_lease(
    s3, tiny_shards, tiny_config, tmp_path, monkeypatch
):
    cfg = tiny_config(tiny_shards, f"s3://{BUCKET}/runs")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        held = put_lease(s3, proc.pid, age_s=5)
        checked = []
        monkeypatch.setattr("pipeline.data.check_splits", lambda *a, **k: checked.append(1))
        start = time.monotonic()
        with pytest.raises(RunLockError, match=f"pid {proc.pid}"):
            train(cfg, local=True)
        with pytest.raises(RunLockError, match=f"pid {proc.pid}"):
            dry_run(cfg, local=True)
        assert time.monotonic() - start < 10 and checked == []
    finally:
        proc.kill()
        proc.wait()
    objects = s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    keys = [o["Key"] for o in objects if not o["Key"].endswith("/")]  # but directory markers
    assert keys == [KEY] and lease(s3) == held  # nothing written, the lease untouched
    assert not run_dir_for(cfg).joinpath("config.yaml").exists()
    assert json.loads(s3.get_object(Bucket=BUCKET, Key=KEY)["Body"].read())["pid"] == proc.pid


def test_ctrl_c_between_write_and_read_back_leaves_no_lease(storage, s3, monkeypatch):
    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.train.lock.time.sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        RunLock(storage).acquire()
    assert lease(s3) is None
