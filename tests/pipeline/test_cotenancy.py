"""Two local Ray runs on one machine at once (issue 10): neither may lose a worker.

Ray Train V2's PlacementGroupCleaner (a detached actor per run) polls the state API to see
whether its controller is alive, and removes the run's placement group when it is not. Left
to find the state API itself, it reads /tmp/ray/ray_current_cluster or greps `ps` for raylets
("Found multiple active Ray instances": the cleaner's thread dies), and a dashboard-less
instance advertises 127.0.0.1:8265 without serving it, so a neighbour's dashboard there
answers that the controller does not exist: "controller ... is dead", the placement group is
removed, the worker is destroyed. `init_ray` must point every embedded instance at its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

pytestmark = pytest.mark.ray

# What a run's Ray output shows when its cleaner looked at the wrong Ray instance.
BAD = (
    "placement group was removed",  # the worker: "Destroying worker since its placement ..."
    "is dead. Cleaning up placement group",  # the cleaner: "controller actor (...) is dead"
    "Found multiple active Ray instances",  # the cleaner's monitor thread crashed
    "Failed to register placement group with cleaner",  # the cleaner had already exited
)
RAY_UP = "Started a local Ray instance"
WORKER_UP = "Setting up process group"  # a TorchTrainer worker group has started


def test_train_and_tune_side_by_side(tmp_path, tiny_shards):
    """`capsnet train` runs; a `capsnet tune` starts next to it: both finish, no worker lost."""
    base = {
        "data": {"shards": str(tiny_shards), "loader_workers": 0, "augment": False},
        "model": {"type": "capsnet", "preset": "tiny"},
        "train": {"epochs": 1, "batch_size": 32, "eval_batch_size": 40, "log_every": 100},
        "run": {"use_gpu": False, "max_failures": 0},  # a lost worker fails the run
    }
    storage = {"train": tmp_path / "runs", "tune": tmp_path / "tune"}
    search = {"name": "s", "storage_path": str(storage["tune"]), "num_samples": 1}
    search |= {"space": {"train.lr": {"grid": [0.01]}}, "scheduler": {"type": "fifo"}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump({**base, "search": search}))
    cli = [sys.executable, "-m", "pipeline.cli"]
    cmds = {
        # 40 epochs: long enough to outlast the start of the tune run's workers
        "train": [*cli, "train", "--config", str(tmp_path / "train.yaml"), "--set"]
        + [f"run.storage_path={storage['train']}", "--set", "train.epochs=40"],
        "tune": [*cli, "tune", "--config", str(tmp_path / "tune.yaml")],
    }
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # embedded Ray, both
    procs: dict[str, subprocess.Popen] = {}

    def start(name):
        with open(tmp_path / f"{name}.out", "w") as out:
            procs[name] = subprocess.Popen(
                cmds[name], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def output(name):  # the terminal's lines, and Ray's if the run keeps them in its log.txt
        files = [tmp_path / f"{name}.out", *sorted(storage[name].rglob("log.txt"))]
        return "".join(f.read_text(errors="replace") for f in files if f.is_file())

    def wait_for(name, text, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline and procs[name].poll() is None and text not in output(name):
            time.sleep(0.5)
        assert text in output(name), f"{name}: no {text!r}:\n{output(name)[-4000:]}"

    try:
        start("train")
        wait_for("train", RAY_UP, 120)
        start("tune")  # its own Ray instance, with a dashboard, next to the train run's
        wait_for("tune", WORKER_UP, 150)
        overlapped = procs["train"].poll() is None
        for proc in procs.values():
            proc.wait(timeout=240)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the run and the Ray instance it started
                proc.wait()
    for name in procs:
        text = output(name)
        assert procs[name].returncode == 0, f"{name} failed:\n{text[-4000:]}"
        bad = [line for line in text.splitlines() if any(b in line for b in BAD)]
        assert not bad, f"{name}'s Ray cleaner looked at the other instance:\n" + "\n".join(bad)
        assert WORKER_UP in text, f"{name}: no worker group started:\n{text[-4000:]}"
    assert overlapped, "the train run ended before the tune run's workers started: lengthen it"
