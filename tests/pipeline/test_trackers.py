"""run.report_to: TensorBoard (per-step loss and lr, epoch metrics, the reconstructions image),
W&B in offline mode and MLflow's file store, all from one local run."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError
from pipeline.train.loop import run_dir_for
from pipeline.train.trainer import train


def test_every_tracker_gets_the_run(tiny_shards, tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: the file store is opt-in
    cfg = tiny_config(
        tiny_shards,
        tmp_path / "runs",
        "train.epochs=2",
        "run.report_to=[tensorboard, wandb, mlflow]",
    )
    train(cfg, local=True)
    run_dir = run_dir_for(cfg)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"step/loss", "step/lr", "test_accuracy"} <= set(tags["scalars"])
    assert len(events.Scalars("step/loss")) >= 2 * (320 // 32) // 3  # every log_every=3 steps
    assert [e.step for e in events.Scalars("test_accuracy")] == [1, 2]
    assert "reconstructions" in tags["images"] and len(events.Images("reconstructions")) == 2

    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline, "no offline W&B run was written"

    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "capsnet"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [
        r["test_accuracy"] for r in rows
    ]
    assert run.data.params["train.lr"] == str(cfg.train.lr)


def test_unknown_tracker_is_a_config_error():
    from pipeline.config import load_config

    with pytest.raises(ConfigError, match="run.report_to"):
        load_config(None, ["run.report_to=[comet]"])
