"""A failed trial must not end a search (issue 19 item 8): a real search on Ray in which one
trial's run dies of a NaN loss and the other finishes."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import yaml

from tests.pipeline.test_tune import search_config


@pytest.mark.ray
@pytest.mark.slow
def test_a_nan_trial_is_listed_as_failed_and_the_search_finishes(tmp_path, tiny_shards):
    """lr=1e30 diverges in its first steps (its run reports only the fatal error); lr=1e-3
    trains one epoch. The search exits 0, ranks the finite trial best and lists the NaN trial
    with its reason, run once (a deterministic failure is not retried)."""
    path = search_config(
        tmp_path / "s.yaml",
        tiny_shards,
        tmp_path / "runs",
        space={"train.lr": {"grid": [1.0e30, 1.0e-3]}},
        max_failures=1,  # a retry would run the NaN trial twice
    )
    raw = yaml.safe_load(path.read_text())
    raw["train"]["epochs"] = 1
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "pipeline.cli", "tune", "--config", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]

    exp_dir = tmp_path / "runs" / "tiny-search"
    with open(exp_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["train.lr"]) for r in rows] == [1.0e-3, 1.0e30]  # the finite trial first
    good, bad = rows
    assert good["error"] == "" and good["epochs_run"] == "1"
    assert 0.0 <= float(good["best_test_accuracy"]) <= 1.0
    assert bad["error"].startswith("NonFiniteLossError"), bad
    assert "nan" in bad["error"].lower() or "inf" in bad["error"].lower(), bad
    assert bad["best_test_accuracy"] == "nan" and bad["stopped_early"] == "False"
    assert f"trial {bad['trial']} failed: {bad['error']}" in proc.stdout  # printed, too
    best = yaml.safe_load((exp_dir / "best-config.yaml").read_text())
    assert best["train"]["lr"] == pytest.approx(1.0e-3)
    (trial_dir,) = exp_dir.glob(f"trial_driver_{bad['trial']}_*")
    reports = (trial_dir / "result.json").read_text().splitlines()
    assert len(reports) == 1 and "NonFiniteLossError" in reports[0], "the NaN trial was retried"
    assert not (trial_dir / "error.txt").exists()  # ended like any trial, not as a Tune error
