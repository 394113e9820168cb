"""capsnet tune: search-config validation (fast) and a tiny real search (Ray tier)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.tune import load_tune_config

# capscore's tiny preset (image size from the data), with a W init that learns within 3 epochs
TINY = {"preset": "tiny", "weight_init_std": 0.5}


def search_config(path: Path, shards, storage, **search) -> Path:
    raw = {
        "data": {"shards": str(shards), "loader_workers": 0, "augment": False},
        "model": {"type": "capsnet", **TINY},
        "train": {"epochs": 3, "batch_size": 32, "eval_batch_size": 40, "log_every": 5},
        "run": {"use_gpu": False, "max_failures": 0},
        "search": {
            "name": "tiny-search",
            "storage_path": str(storage),
            "num_samples": 1,
            "space": {"train.lr": {"grid": [0.02, 0.01, 1.0e-7, 1.0e-8]}},
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
            "max_concurrent_trials": 1,
            **search,
        },
    }
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "space, message",
    [
        ({"train.lrr": {"choice": [1]}}, "train.lrr"),
        ({"model.routing.iterations": {"choice": []}}, "at least 1 item"),
        ({"train.lr": {"choice": [0.0, 1e-3]}}, "train.lr"),
        ({"train.lr": {"loguniform": [0, 1e-3]}}, "loguniform.0: Input should be greater than 0"),
        ({"train.lr": {"uniform": [1e-3, 1e-4]}}, "low must be < high"),
        ({"train.lr": {"normal": [0, 1]}}, "choice"),
        ({"optimizer.lr": {"choice": [1e-3]}}, "optimizer"),
        ({"model.routing.iterations": {"choice": [0, 3]}}, "routing.iterations"),
        ({"model.routing.name": {"choice": ["dynamic", "nope"]}}, "routing.name"),
    ],
)
def test_search_space_errors_fail_before_ray(tmp_path, tiny_shards, space, message):
    path = search_config(tmp_path / "s.yaml", tiny_shards, tmp_path, space=space)
    with pytest.raises(ConfigError, match=message):
        load_tune_config(path)


def test_search_section_errors(tmp_path, tiny_shards):
    path = search_config(tmp_path / "s.yaml", tiny_shards, tmp_path)
    with pytest.raises(ConfigError, match="search.scheduler.type"):
        load_tune_config(path, ["search.scheduler={type: hyperband}"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_tune_config(path, ["search.samples=3"])
    tc = load_tune_config(path, ["search.num_samples=2", "train.epochs=5"])
    assert tc.search.num_samples == 2 and tc.base["train"]["epochs"] == 5


def test_validation_does_not_import_ray(tmp_path, tiny_shards):
    path = search_config(tmp_path / "s.yaml", tiny_shards, tmp_path)
    code = (
        f"import sys; from pipeline.tune import load_tune_config; load_tune_config({str(path)!r}); "
        "assert 'ray' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _trial_epochs(exp_dir: Path) -> dict[str, list[int]]:
    runs = {}
    for metrics in sorted((exp_dir / "trial_runs").glob("*/metrics.jsonl")):
        runs[metrics.parent.name] = [
            json.loads(l)["epoch"] for l in metrics.read_text().splitlines()
        ]
    return runs


@pytest.mark.ray
def test_search_interrupted_then_resumed(tmp_path, tiny_shards):
    """4 trials x 3 epochs, one at a time: interrupt after the first trial finishes, resume, and
    check that finished trials are not rerun, ASHA stopped some, and the best config trains."""
    path = search_config(tmp_path / "s.yaml", tiny_shards, tmp_path / "runs")
    exp_dir = tmp_path / "runs" / "tiny-search"
    cmd = [sys.executable, "-m", "pipeline.cli", "tune", "--config", str(path)]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if any(e and e[-1] == 3 for e in _trial_epochs(exp_dir).values()):
                    break
                time.sleep(1)
            assert proc.poll() is None, (
                "search ended before it was interrupted:\n"
                + (tmp_path / "first.log").read_text()[-3000:]
            )
            proc.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves its state and stops
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    first = _trial_epochs(exp_dir)
    finished = {k: v for k, v in first.items() if v and v[-1] == 3}
    assert finished and len(first) < 4, first

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = _trial_epochs(exp_dir)
    for trial, epochs in finished.items():
        assert after[trial] == epochs, f"finished trial {trial} was rerun: {after[trial]}"
    with open(exp_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert any(r["stopped_early"] == "True" for r in rows), rows
    assert float(rows[0]["best_test_accuracy"]) >= max(float(r["best_test_accuracy"]) for r in rows)
    assert (exp_dir / "search.png").stat().st_size > 1000
    best = load_config(
        exp_dir / "best-config.yaml",
        ["train.epochs=1", "run.name=from-best", f"run.storage_path={tmp_path / 'best'}"],
    )
    assert best.train.lr == pytest.approx(float(rows[0]["train.lr"]))
    from pipeline.train.trainer import train

    assert train(best, local=True).epochs == 1


def test_set_reaches_the_search_space(tmp_path, tiny_shards):
    path = search_config(tmp_path / "s.yaml", tiny_shards, tmp_path)
    tc = load_tune_config(
        path,
        [
            "search.space.train.lr={loguniform: [1e-4, 1e-2]}",
            "search.space.model.routing.iterations={choice: [1, 2]}",
        ],
    )
    assert tc.search.values("train.lr") == [1e-4, 1e-2]  # YAML 1.1 strings became floats
    assert tc.search.values("model.routing.iterations") == [1, 2]
