"""Ray tier, end to end: `make train-cluster` against a real 2-node Ray cluster on loopback.

The cluster (tests/cluster/conftest.py) has a 1-CPU head and a 1-CPU worker node with token
auth; the run asks for 2 workers x 1 CPU, so the two DDP ranks must sit on different nodes.
Shards and storage are local folders, which both nodes see because they share this machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def write_config(path, shards, storage, name: str, epochs: int, max_failures: int):
    config = {
        "data": {"shards": str(shards), "loader_workers": 0, "shuffle_buffer": 64},
        "model": {"type": "capsnet", "preset": "tiny"},
        "train": {"epochs": epochs, "batch_size": 32, "eval_batch_size": 32, "log_every": 5},
        "run": {
            "name": name,
            "storage_path": str(storage),
            "num_workers": 2,
            "use_gpu": False,
            "cpus_per_worker": 1,
            "max_failures": max_failures,
            "keep_checkpoints": 1,
        },
    }
    header = (
        f"# Test-only 2-worker CPU run over a 2-node local cluster.\n"
        f"# Command: make train-cluster CONFIG={path}\n# Expected runtime: ~1 min\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def make_train_cluster(cluster, config) -> list[str]:
    # -o: the venv is already installed (the stamp may be missing outside `make install`);
    # PY: the interpreter running these tests.
    return [
        "make",
        "--no-print-directory",
        "-o",
        ".venv/.installed",
        "train-cluster",
        f"RAY_ADDRESS={cluster.dashboard}",
        f"CONFIG={config}",
        f"PY={sys.executable}",
    ]


def epochs_in(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


def test_train_cluster_two_nodes(ray_cluster, tiny_shards, tmp_path):
    storage = tmp_path / "runs"
    config = write_config(
        tmp_path / "tiny.yaml", tiny_shards, storage, "e2e", epochs=2, max_failures=0
    )
    result = ray_cluster.run(make_train_cluster(ray_cluster, config), timeout=480, cwd=REPO)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert "succeeded" in out

    run_dir = storage / "e2e"
    assert epochs_in(run_dir) == [1, 2]
    from pipeline.train.checkpoint import resolve_checkpoint

    for name in ("best", "last"):  # names in checkpoints.json, of Ray's own kept checkpoints
        assert resolve_checkpoint(run_dir, name).parent.parent == run_dir
    assert list(run_dir.glob("checkpoint_*/checkpoint.pt")), "Ray stored no checkpoint"
    assert len(ray_cluster.train_worker_nodes()) == 2, "the 2 ranks did not use both nodes"


def test_wrong_token_is_refused(ray_cluster, tiny_shards, tmp_path):
    config = write_config(
        tmp_path / "tiny.yaml", tiny_shards, tmp_path / "runs", "refused", epochs=1, max_failures=0
    )
    env = {**ray_cluster.env, "RAY_AUTH_TOKEN": "not-the-token"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "submit",
            "train",
            "--config",
            str(config),
            "--address",
            ray_cluster.dashboard,
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "auth token" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_train_cluster_survives_node_loss(ray_cluster, tiny_shards, tmp_path):
    """Kill the worker node mid-run (SIGKILL to all its processes, like a reclaimed spot VM),
    bring up a replacement node as an autoscaler would, and the job still finishes: Ray
    restarts the worker group and training continues from the last checkpoint."""
    storage, epochs = tmp_path / "runs", 8
    config = write_config(
        tmp_path / "tiny.yaml", tiny_shards, storage, "nodeloss", epochs=epochs, max_failures=2
    )
    run_dir = storage / "nodeloss"
    log_path = tmp_path / "make.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            make_train_cluster(ray_cluster, config),
            env=ray_cluster.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            # Wait for a checkpoint Ray has persisted, so the restart has something to resume.
            deadline = time.monotonic() + 300
            while not list(run_dir.glob("checkpoint_*/checkpoint.pt")) and proc.poll() is None:
                assert time.monotonic() < deadline, "no checkpoint in 300 s"
                time.sleep(0.2)
            done_before = epochs_in(run_dir)
            assert proc.poll() is None and done_before and done_before[-1] < epochs, (
                f"the run ended before a node could be removed: {log_path.read_text()[-3000:]}"
            )
            ray_cluster.kill_node("worker1")
            ray_cluster.add_node("worker2", num_cpus=1)
            rc = proc.wait(timeout=480)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = log_path.read_text()
    assert rc == 0, out[-6000:]
    seen = epochs_in(run_dir)
    # Continued, not restarted: every epoch exactly once (a row is written after its
    # checkpoint, and a resume drops rows of epochs the checkpoint does not hold).
    assert seen == list(range(1, epochs + 1)), f"epochs lost or repeated: {seen}"
    assert "resuming nodeloss" in out, "the restarted workers did not resume from a checkpoint"
    from pipeline.train.checkpoint import resolve_checkpoint

    assert resolve_checkpoint(run_dir, "last").is_file()
    # ranks ran on the head, the removed node and its replacement
    assert len(ray_cluster.train_worker_nodes()) == 3
