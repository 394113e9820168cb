"""One writer per run (issue 19 item 4): the local lock file, and `train` refusing a held run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline.config import ConfigError
from pipeline.train import trainer
from pipeline.train.lock import Holder, RunLock, RunLockError
from pipeline.train.loop import run_dir_for
from pipeline.train.storage import LOCK_KEY, RunStorage
from pipeline.train.trainer import dry_run, train


def local_lock(run_dir) -> RunLock:
    return RunLock(RunStorage("", "tiny", run_dir))


def write_lock(run_dir, pid: int, host: str | None = None) -> Holder:
    """A lock file as another `capsnet train` (pid, on host) leaves one, by the real writer."""
    holder = Holder(host or socket.gethostname(), pid, time.time() - 60, time.time() - 60)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_KEY).write_bytes(holder.encode())
    return holder


@pytest.fixture
def live_pid():
    """The pid of a live process of ours (a `sleep`), killed and reaped afterwards."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process (not even a zombie)
    return proc.pid


def test_second_acquisition_fails_naming_the_holder(tmp_path):
    first, second = local_lock(tmp_path / "tiny"), local_lock(tmp_path / "tiny")
    with first.hold() as me:
        with pytest.raises(RunLockError) as err:
            second.acquire()
        message = str(err.value)
        assert isinstance(err.value, ConfigError)  # the CLI: one line, exit 2
        assert f"host {socket.gethostname()}" in message and f"pid {me.pid}" in message
        assert "since " in message and str(tmp_path / "tiny" / LOCK_KEY) in message
        assert "\n" not in message
        assert json.loads((tmp_path / "tiny" / LOCK_KEY).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "tiny" / LOCK_KEY).exists()  # released
    with second.hold():  # free again
        pass


def test_release_on_error_removes_the_lock(tmp_path):
    with pytest.raises(KeyboardInterrupt), local_lock(tmp_path).hold():
        assert (tmp_path / LOCK_KEY).is_file()
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # no lock, no private temporary names left


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, dead_pid, capsys):
    stale = write_lock(tmp_path, dead_pid)
    lock = local_lock(tmp_path)
    assert "would take over the stale lock" in lock.check()  # dry run: looks only
    assert Holder.parse((tmp_path / LOCK_KEY).read_bytes()) == stale
    with lock.hold() as me:
        assert me.pid == os.getpid()
        assert Holder.parse((tmp_path / LOCK_KEY).read_bytes()) == me
    assert f"took over the stale lock {tmp_path / LOCK_KEY}" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_live_or_foreign_holder_is_not_taken_over(tmp_path, live_pid, dead_pid):
    write_lock(tmp_path / "a", live_pid)
    with pytest.raises(RunLockError, match=f"pid {live_pid}"):
        local_lock(tmp_path / "a").acquire()
    with pytest.raises(RunLockError, match=f"pid {live_pid}"):
        local_lock(tmp_path / "a").check()
    # another host's pid says nothing here, dead or not
    write_lock(tmp_path / "b", dead_pid, host="elsewhere.example")
    with pytest.raises(RunLockError, match="host elsewhere.example"):
        local_lock(tmp_path / "b").acquire()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path, live_pid):
    lock = local_lock(tmp_path)
    lock.acquire()
    rival = write_lock(tmp_path, live_pid)  # e.g. someone deleted ours and took the run
    lock.release()
    assert Holder.parse((tmp_path / LOCK_KEY).read_bytes()) == rival


def test_train_fails_fast_while_another_live_run_holds_it(
    tiny_shards, tiny_config, tmp_path, live_pid, monkeypatch
):
    cfg = tiny_config(tiny_shards, tmp_path)
    run_dir = run_dir_for(cfg)
    write_lock(run_dir, live_pid)
    checked = []
    monkeypatch.setattr("pipeline.data.check_splits", lambda *a, **k: checked.append(1))
    start = time.monotonic()
    with pytest.raises(RunLockError, match=f"pid {live_pid}"):
        train(cfg, local=True)
    with pytest.raises(RunLockError, match=f"pid {live_pid}"):
        dry_run(cfg, local=True)
    assert time.monotonic() - start < 5 and checked == []  # before the data is even read
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_KEY]  # nothing written
    assert Holder.parse((run_dir / LOCK_KEY).read_bytes()).pid == live_pid


def test_train_holds_the_lock_while_running_and_releases_it(
    tiny_shards, tiny_config, tmp_path, monkeypatch
):
    cfg = tiny_config(tiny_shards, tmp_path, "train.epochs=1")
    run_dir = run_dir_for(cfg)
    seen = []
    real = trainer.train_loop

    def spy(config, ctx):
        seen.append(Holder.parse((run_dir / LOCK_KEY).read_bytes()))
        return real(config, ctx)

    monkeypatch.setattr(trainer, "train_loop", spy)
    train(cfg, local=True)
    assert seen[0].pid == os.getpid()
    assert not (run_dir / LOCK_KEY).exists()
    assert "the run has finished" in dry_run(cfg, local=True)
    assert not (run_dir / LOCK_KEY).exists()  # the dry run took nothing


def test_cli_prints_the_holder_in_one_line_exit_2(tiny_shards, tmp_path, live_pid, capsys):
    from pipeline.cli import main
    from tests.pipeline.conftest import TINY_MODEL

    write_lock(tmp_path / "tiny", live_pid)
    sets = [*TINY_MODEL, f"data.shards={tiny_shards}", f"run.storage_path={tmp_path}"]
    sets += ["run.name=tiny", "run.use_gpu=false", "data.loader_workers=0"]
    argv = ["train", "--local", *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("capsnet train: error: run 'tiny' is in use by another")
    assert f"pid {live_pid}, since " in err[0] and err[1:] == [
        "(set CAPSNET_DEBUG=1 for a traceback)"
    ]
