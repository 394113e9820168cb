"""capsnet tune: search-config validation (fast) and a tiny real search (Ray tier)."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from capscore import ROUTINGS
from pipeline import tune
from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.train.context import FATAL_KEY
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
    assert tc.search.num_samples == 2 and tc.base.train.epochs == 5


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
def test_search_interrupted_then_resumed(tmp_path, tiny_shards, capsys, monkeypatch):
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
    log = (tmp_path / "first.log").read_text()
    assert proc.returncode == 130, log[-3000:]
    assert f"interrupted: continue with: capsnet tune --config {path} --resume" in log
    assert "Tuner.restore" not in log  # Tune's own hint names its Python API, not the CLI
    first = _trial_epochs(exp_dir)
    finished = {k: v for k, v in first.items() if v and v[-1] == 3}
    assert finished and len(first) < 4, first

    # With Tune's state saved: --dry-run says it would resume, a new search is refused.
    monkeypatch.setattr("pipeline.train.trainer.init_ray", no_ray)
    assert main(["tune", "--config", str(path), "--resume", "--dry-run"]) == 0
    assert f"would resume the search in {exp_dir}" in capsys.readouterr().out
    assert main(["tune", "--config", str(path)]) == 2
    assert f"{exp_dir} already holds this experiment: add --resume" in capsys.readouterr().err
    monkeypatch.undo()

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


# --- before Ray starts: the scheduler against the run, the experiment folder (issue 18) -----

REPO = Path(__file__).resolve().parents[2]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err.splitlines()[0]


@pytest.mark.parametrize(
    "config, overrides, message",
    [
        (  # the shipped config, shortened: Ray's "grace_period must be <= max_t!" before
            REPO / "configs/tune-routing.yaml",
            ["train.epochs=1"],
            "search.scheduler.grace_period=2 is longer than train.epochs=1",
        ),
        (
            None,
            ["search.scheduler.grace_period=2", "search.space.train.epochs={choice: [3, 1]}"],
            "search.scheduler.grace_period=2 is longer than the shortest searched train.epochs=1",
        ),
        (
            None,
            ["search.scheduler.grace_period=3", "search.space.train.epochs={randint: [2, 4]}"],
            "search.scheduler.grace_period=3 is longer than the shortest searched train.epochs=2",
        ),
    ],
)
def test_asha_grace_period_longer_than_the_run_is_one_line_exit_2(
    tmp_path, tiny_shards, monkeypatch, capsys, config, overrides, message
):
    monkeypatch.setattr("pipeline.train.trainer.init_ray", no_ray)
    config = config or search_config(tmp_path / "s.yaml", tiny_shards, tmp_path)
    args = ["tune", "--config", str(config), *(w for o in overrides for w in ("--set", o))]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert line.startswith("capsnet tune: error: ") and message in line, line


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.epochs=3", "search.scheduler.grace_period=3"],  # equal: allowed
        ["train.epochs=1", "search.scheduler={type: fifo, grace_period: 2}"],  # FIFO ignores it
    ],
)
def test_grace_period_that_fits_the_run_loads(tmp_path, tiny_shards, overrides):
    path = search_config(tmp_path / "s.yaml", tiny_shards, tmp_path)
    assert load_tune_config(path, overrides).search.scheduler.grace_period in (2, 3)


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
def test_resume_without_an_experiment_is_one_line_exit_2_before_ray(
    tmp_path, tiny_shards, monkeypatch, capsys, dry_run
):
    import ray

    monkeypatch.setattr("pipeline.train.trainer.init_ray", no_ray)
    path = search_config(tmp_path / "s.yaml", tiny_shards, tmp_path / "runs")
    args = ["tune", "--config", str(path), "--resume", *(["--dry-run"] if dry_run else [])]
    assert main(args) == 2
    exp_dir = tmp_path / "runs" / "tiny-search"
    assert one_error_line(capsys) == (
        f"capsnet tune: error: --resume: no experiment to resume at {exp_dir}"
    )
    assert not ray.is_initialized()  # Tuner.can_restore only looked for the state file


def test_auto_workers_mean_one_worker_per_trial(tmp_path, tiny_shards):
    path = search_config(tmp_path / "s.yaml", tiny_shards, tmp_path)
    tc = load_tune_config(path)  # the search config leaves run.num_workers at auto
    assert tc.base.run.num_workers == 1
    assert load_tune_config(path, ["run.num_workers=2"]).base.run.num_workers == 2
    tc = load_tune_config(path, ["search.space.run.num_workers={choice: [auto, 2]}"])
    workers = [tune.trial_config(tc.base, {"run.num_workers": w}) for w in ("auto", 2)]
    assert [cfg.run.num_workers for cfg in workers] == [1, 2]


# --- before Ray starts: data and search algorithm ---------------------------------------------


def no_ray(*args, **kwargs):
    raise AssertionError("Ray was started")


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.shards=MISSING", "data.shards: MISSING/dataset.json: no such file"),
        ("data.eval_split=val", "data.eval_split: synthetic: no split 'val'; available: "),
        ("search.space.data.train_split={choice: [train, extra]}", "no split 'extra'"),
    ],
)
def test_missing_data_fails_before_ray(tmp_path, tiny_shards, monkeypatch, override, message):
    path = search_config(tmp_path / "s.yaml", tiny_shards, tmp_path)
    missing = str(tmp_path / "nope")
    tc = load_tune_config(path, [override.replace("MISSING", missing)])
    monkeypatch.setattr(tune.run, "_fit", no_ray)
    with pytest.raises(ConfigError, match=re.escape(message.replace("MISSING", missing))):
        tune.run_tune(tc, config_path=path)


def test_optuna_missing_fails_before_ray(tmp_path, tiny_shards, monkeypatch):
    path = search_config(tmp_path / "s.yaml", tiny_shards, tmp_path, search_alg="optuna")
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    with pytest.raises(ConfigError, match="needs optuna: pip install"):
        load_tune_config(path)


def test_optuna_is_checked_without_importing_ray(tmp_path, tiny_shards, monkeypatch):
    path = search_config(
        tmp_path / "s.yaml",
        tiny_shards,
        tmp_path,
        search_alg="optuna",
        space={"train.lr": {"loguniform": [1e-4, 1e-2]}},
    )
    monkeypatch.setitem(sys.modules, "optuna", types.ModuleType("optuna"))
    monkeypatch.setitem(sys.modules, "ray.tune.search.optuna", None)  # Ray's side: not here
    assert load_tune_config(path).search.search_alg == "optuna"
    with pytest.raises(ConfigError, match="grid entries"):
        load_tune_config(path, ["search.space.train.lr={grid: [0.1, 0.01]}"])


# --- reporting, with stand-ins for Ray's results (no Ray) -------------------------------------


class Frame(list):
    """Result.metrics_dataframe: rows of reported metrics."""

    def to_dict(self, orient):
        assert orient == "records"
        return list(self)


@dataclass
class FakeResult:
    """ray.tune.Result: what result_rows reads."""

    config: dict
    metrics: dict
    path: str
    error: BaseException | None = None
    metrics_dataframe: Frame | None = None


def fake_result(trial: str, lr: float, accuracies: list[float]) -> FakeResult:
    rows = [
        {"epoch": e + 1, "test_accuracy": a, "epoch_time_s": 2.0, "trial_id": trial}
        for e, a in enumerate(accuracies)
    ]
    return FakeResult(
        config={"params": {"train.lr": lr}, "trial_storage": ""},
        metrics=dict(rows[-1]) if rows else {},
        path=f"/exp/tiny-search/{trial}",
        metrics_dataframe=Frame(rows) if rows else None,
    )


@dataclass
class FakeGrid(list):
    """ray.tune.ResultGrid: the results and the counts of finished trials."""

    results: list = field(default_factory=list)
    num_terminated: int = 0
    num_errors: int = 0

    def __post_init__(self):
        self.extend(self.results)


def test_no_best_config_without_a_finite_metric(tmp_path, tiny_shards, capsys):
    tc = load_tune_config(search_config(tmp_path / "s.yaml", tiny_shards, tmp_path))
    results = [
        fake_result("t1", 0.02, [math.nan, math.nan]),
        fake_result("t2", 0.01, []),  # never ran (interrupted search)
    ]
    rows = tune.report(results, tc, tmp_path / "exp")
    out = capsys.readouterr().out
    assert len(rows) == 2 and all(math.isnan(r["best_test_accuracy"]) for r in rows)
    assert (tmp_path / "exp" / "results.csv").is_file() and "t1" in out  # table still printed
    assert not (tmp_path / "exp" / "best-config.yaml").exists()
    assert "no trial reported a finite test_accuracy" in out


def test_a_failed_trial_is_listed_with_its_reason(tmp_path, tiny_shards, capsys):
    """A run that died of a NaN loss after an epoch: Tune's last row is its fatal report (the
    metric NaN, no epoch); the row keeps the epoch run, is not 'stopped early', and says why."""
    tc = load_tune_config(search_config(tmp_path / "s.yaml", tiny_shards, tmp_path))
    reason = "NonFiniteLossError: non-finite loss at global step 12 (0-based): part 'margin' = nan"
    failed = fake_result("t1", 1.0e30, [0.1])
    fatal_row = {"test_accuracy": math.nan, "epoch": math.nan, "epoch_time_s": math.nan}
    failed.metrics_dataframe.append({**fatal_row, FATAL_KEY: reason, "trial_id": "t1"})
    failed.metrics = {FATAL_KEY: reason, "test_accuracy": math.nan, "trial_id": "t1"}
    rows = tune.report([failed, fake_result("t2", 0.01, [0.3, 0.5])], tc, tmp_path / "exp")
    out = capsys.readouterr().out
    assert [r["trial"] for r in rows] == ["t2", "t1"]
    bad = rows[1]
    assert (bad["error"], bad["epochs_run"], bad["stopped_early"]) == (reason, 1, False)
    assert bad["best_test_accuracy"] == 0.1 and bad["device_hours"] == pytest.approx(2.0 / 3600)
    assert rows[0]["error"] == "" and rows[0]["stopped_early"] is True  # 2 of 3 epochs
    assert f"[capsnet] trial t1 failed: {reason}" in out
    with open(tmp_path / "exp" / "results.csv") as f:
        assert [r["error"] for r in csv.DictReader(f)] == ["", reason]


def test_nan_epochs_do_not_hide_a_finite_best(tmp_path, tiny_shards, capsys):
    tc = load_tune_config(search_config(tmp_path / "s.yaml", tiny_shards, tmp_path))
    results = [
        fake_result("t1", 0.02, [0.3]),
        fake_result("t2", 0.01, [math.nan, 0.6]),
        fake_result("t3", 1e-7, [math.nan]),
    ]
    rows = tune.report(results, tc, tmp_path / "exp")
    assert [r["trial"] for r in rows] == ["t2", "t1", "t3"]
    assert rows[0]["best_test_accuracy"] == 0.6
    header = (tmp_path / "exp" / "best-config.yaml").read_text().splitlines()[0]
    assert "test_accuracy 0.6000" in header and "0.01" in header


# --- Ctrl-C: `capsnet tune --resume`, exit status 130 ----------------------------------------


def test_interrupt_prints_the_resume_command(tmp_path, tiny_shards, monkeypatch, capsys):
    path = search_config(tmp_path / "s.yaml", tiny_shards, tmp_path)
    tc = load_tune_config(path, ["search.num_samples=2"])
    resume = f"capsnet tune --config {path} --set search.num_samples=2 --resume"

    def ctrl_c(*args):  # a second Ctrl-C: Tune's fit() raises
        raise KeyboardInterrupt

    monkeypatch.setattr(tune.run, "_fit", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        tune.run_tune(tc, config_path=path, overrides=["search.num_samples=2"])
    assert f"interrupted: continue with: {resume}" in capsys.readouterr().out

    # The first Ctrl-C: Tune saves its state and fit() returns the trials so far.
    partial = FakeGrid([fake_result("t1", 0.02, [0.5]), fake_result("t2", 0.01, [])], 1)
    monkeypatch.setattr(tune.run, "_fit", lambda *args: (partial, True))
    with pytest.raises(KeyboardInterrupt):
        tune.run_tune(tc, config_path=path, overrides=["search.num_samples=2"])
    out = capsys.readouterr().out
    assert (tmp_path / "tiny-search" / "results.csv").is_file()  # the trials so far
    assert out.rstrip().splitlines()[-1] == f"[capsnet] interrupted: continue with: {resume}"


def test_tune_command_exits_130_on_ctrl_c(tmp_path, tiny_shards, monkeypatch):
    path = search_config(tmp_path / "s.yaml", tiny_shards, tmp_path)
    calls = []

    def interrupted(tc, **kwargs):
        calls.append(kwargs)
        raise tune.SearchInterrupted("capsnet tune ... --resume")

    monkeypatch.setattr(tune, "run_tune", interrupted)
    assert main(["tune", "--config", str(path), "--set", "search.num_samples=2"]) == 130
    assert calls == [
        {"config_path": str(path), "overrides": ["search.num_samples=2"], "resume": False}
    ]


def test_interrupt_watch_drops_tunes_restore_hint(caplog):
    logger = logging.getLogger("ray.tune.tune")
    with caplog.at_level(logging.INFO), tune.run._watch_interrupt() as watch:
        logger.info("Total run time: 12.00 seconds")
        assert not watch.seen
        logger.warning(
            "Experiment has been interrupted, but the most recent state was saved.\n"
            'Resume experiment with: Tuner.restore(path="/x", trainable=...)'
        )
    assert watch.seen
    assert "Total run time" in caplog.text and "Tuner.restore" not in caplog.text


def test_print_config_and_dry_run_need_no_ray(tmp_path, tiny_shards, capsys, monkeypatch):
    import sys as _sys

    from pipeline.cli import main

    monkeypatch.setitem(_sys.modules, "ray.tune", None)  # any use of Ray Tune would fail
    path = search_config(tmp_path / "s.yaml", tiny_shards, tmp_path)
    assert main(["tune", "--config", str(path), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["search"]["space"] == {"train.lr": {"grid": [0.02, 0.01, 1.0e-7, 1.0e-8]}}
    assert main(["tune", "--config", str(path), "--dry-run"]) == 0
    assert "would search 4 trial(s)" in capsys.readouterr().out


# --- the routing algorithm as a search axis (issue 14), no Ray -------------------------------

ROUTING_SPACE = {
    "model.routing.name": {"choice": ["dynamic", "uniform", "em", "attention"]},
    "model.routing.iterations": {"choice": [1, 2, 3]},
    "train.lr": {"loguniform": [1e-4, 1e-2]},
}


def test_a_routing_switch_replaces_the_base_routing_and_drops_keys_it_lacks():
    base = {"model": {"type": "capsnet", "routing": {"name": "dynamic", "detach_inner": True}}}
    params = {"model.routing.iterations": 2, "model.routing.name": "uniform"}
    assert tune.apply_params(base, params)["model"]["routing"] == {"name": "uniform"}
    assert tune.not_applicable(base, params) == ["model.routing.iterations"]
    em = tune.apply_params(base, {"model.routing.name": "em", "model.routing.iterations": 2})
    assert em["model"]["routing"] == {"name": "em", "iterations": 2}
    same = tune.apply_params(base, {"model.routing.name": "dynamic", "model.routing.iterations": 1})
    assert same["model"]["routing"] == {"name": "dynamic", "detach_inner": True, "iterations": 1}
    assert base["model"]["routing"] == {"name": "dynamic", "detach_inner": True}  # not mutated


def test_routing_space_validates_each_key_against_the_algorithms_that_have_it(
    tmp_path, tiny_shards
):
    tc = load_tune_config(
        search_config(tmp_path / "s.yaml", tiny_shards, tmp_path, space=ROUTING_SPACE)
    )
    assert tc.search.values("model.routing.name") == ["dynamic", "uniform", "em", "attention"]
    bad = {**ROUTING_SPACE, "model.routing.iterations": {"choice": [0, 3]}}
    with pytest.raises(ConfigError, match=r"iterations=0 \(with model.routing.name='dynamic'\)"):
        load_tune_config(search_config(tmp_path / "b.yaml", tiny_shards, tmp_path, space=bad))
    typo = {**ROUTING_SPACE, "model.routing.iteratons": {"choice": [2]}}
    with pytest.raises(
        ConfigError, match="iteratons: any of model.routing.name=.* has no such key"
    ):
        load_tune_config(search_config(tmp_path / "t.yaml", tiny_shards, tmp_path, space=typo))
    alone = {"model.routing.bias": {"choice": [True]}}  # base routing: dynamic, which has it
    load_tune_config(search_config(tmp_path / "a.yaml", tiny_shards, tmp_path, space=alone))


def routing_result(trial, name, iterations, accuracy, seconds_per_step) -> FakeResult:
    rows = [
        {"epoch": e + 1, "steps": 10, "epoch_time_s": 10 * t, "test_accuracy": a}
        for e, (a, t) in enumerate(zip(accuracy, seconds_per_step, strict=True))
    ]
    params = {"model.routing.name": name, "model.routing.iterations": iterations, "train.lr": 1e-3}
    return FakeResult(
        config={"params": params, "trial_storage": ""},
        metrics=dict(rows[-1]),
        path=f"/exp/tiny-search/{trial}",
        metrics_dataframe=Frame(rows),
    )


def test_routing_search_reports_accuracy_step_time_and_parameters_per_algorithm(
    tmp_path, tiny_shards, capsys
):
    tc = load_tune_config(
        search_config(tmp_path / "s.yaml", tiny_shards, tmp_path, space=ROUTING_SPACE)
    )
    results = [
        routing_result("d1", "dynamic", 3, [0.5, 0.7], [0.05, 0.03]),
        routing_result("d2", "dynamic", 2, [0.6, 0.5], [0.03, 0.03]),
        routing_result("u1", "uniform", 3, [0.4, 0.65], [0.02, 0.04]),
    ]
    rows = tune.report(results, tc, tmp_path / "exp")
    by_trial = {r["trial"]: r for r in rows}
    assert by_trial["u1"]["model.routing.iterations"] == "n/a"
    assert by_trial["d1"]["model.routing.iterations"] == 3
    assert by_trial["d1"]["step_time_ms"] == pytest.approx(40.0)  # median of 50 and 30 ms
    counts = {r["trial"]: r["parameters"] for r in rows}
    assert counts["d1"] == counts["d2"] == counts["u1"] > 0  # no routing parameters here
    summary = tune.routing_summary(rows, "test_accuracy")
    dynamic = next(s for s in summary if s["routing"] == "dynamic")
    assert dynamic["trials"] == 2 and dynamic["best_test_accuracy"] == 0.7
    assert dynamic["mean_test_accuracy"] == pytest.approx(0.65)
    assert dynamic["std_test_accuracy"] == pytest.approx(math.sqrt(0.005))  # sample std
    uniform = next(s for s in summary if s["routing"] == "uniform")
    assert math.isnan(uniform["std_test_accuracy"]) and uniform["step_time_ms"] == 30.0
    with open(tmp_path / "exp" / "routing-summary.csv") as f:
        assert [r["routing"] for r in csv.DictReader(f)] == ["dynamic", "uniform"]
    assert "per routing algorithm" in capsys.readouterr().out
    best = yaml.safe_load((tmp_path / "exp" / "best-config.yaml").read_text())
    routing = best["model"]["routing"]  # written in full: the chosen algorithm's keys only
    assert (routing["name"], routing["iterations"]) == ("dynamic", 3)
    assert set(routing) == set(ROUTINGS["dynamic"].keys)
    assert load_config(tmp_path / "exp" / "best-config.yaml").model.routing.iterations == 3
