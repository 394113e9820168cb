"""Ray tier: the real TorchTrainer on CPU (gloo). Slow (Ray start + worker groups), kept small.

One Ray instance per module: loopback, explicit CPUs, no dashboard, shut down at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.train.loop import run_dir_for

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from pipeline.train.trainer import init_ray

    init_ray(num_cpus=4)  # its own dashboard on a free loopback port: see init_ray
    yield ray
    ray.shutdown()


def metrics_of(cfg):
    path = run_dir_for(cfg) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_workers_then_rerun_does_not_retrain(ray_local, tiny_shards, tiny_config, tmp_path):
    from pipeline.train.trainer import train

    cfg = tiny_config(tiny_shards, tmp_path, "run.num_workers=2", "run.name=ddp2")
    summary = train(cfg)
    rows = metrics_of(cfg)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        steps = row["rank_steps"]
        assert len(steps) == 2 and steps[0] == steps[1] == 320 // 32  # global batch 32 = 2 x 16
        sums = row["rank_first_batch_sums"]
        assert sums[0] != sums[1]  # the ranks trained on different data
        assert row["test_samples"] == 80  # exact eval across both ranks
    ray_ckpts = list(run_dir_for(cfg).glob("checkpoint_*/checkpoint.pt"))
    assert ray_ckpts, "Ray stored no checkpoint"
    assert summary.checkpoint and summary.epochs == 2
    before = (run_dir_for(cfg) / "metrics.jsonl").read_text()
    again = train(cfg)  # the same command again: resumes a finished run, trains nothing
    assert (run_dir_for(cfg) / "metrics.jsonl").read_text() == before
    assert again.epochs == 2


def test_worker_crash_restarts_from_checkpoint(ray_local, tiny_shards, tiny_config, tmp_path):
    from pipeline.train.trainer import train

    marker = tmp_path / "crashed"
    cfg = tiny_config(
        tiny_shards,
        tmp_path,
        "train.epochs=3",
        "run.max_failures=1",
        "run.name=crash",
        "debug.crash_once_at_epoch=1",
        f"debug.crash_marker={marker}",
    )
    summary = train(cfg)
    assert marker.exists(), "the injected crash did not happen"
    epochs = [r["epoch"] for r in metrics_of(cfg)]
    assert epochs == [1, 2, 3], f"epochs restarted instead of continuing: {epochs}"
    assert summary.epochs == 3


def test_config_error_fails_before_ray_starts(tmp_path):
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        "rc = main(['train', '--set', 'train.lrr=1'])\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode != 0
    assert "train.lrr" in result.stderr
    assert "ray was imported" not in result.stderr


def test_non_finite_loss_is_not_retried(ray_local, tiny_shards, tiny_config, tmp_path):
    """A NaN loss is deterministic: it used to be retried max_failures times (RETRY, RETRY,
    RAISE), failing the same way each time. Now every rank stops at the same check and the
    run fails once, naming the step."""
    from pipeline.train.context import TrainingError
    from pipeline.train.trainer import train

    cfg = tiny_config(
        tiny_shards,
        tmp_path,
        "run.num_workers=2",
        "run.max_failures=2",
        "run.name=nan",
        "debug.nan_at_step=4",
        "train.epochs=1",
    )
    with pytest.raises(TrainingError, match=r"non-finite loss at global step 4"):
        train(cfg)
    log = (run_dir_for(cfg) / "log.txt").read_text()
    assert "[FailurePolicy] RETRY" not in log and "Destroying worker" not in log
