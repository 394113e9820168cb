"""Ray assembly: the run config -> a TorchTrainer (Ray Train V2) -> a summary.

`build_trainer` is shared with Ray Tune: a Tune trial builds the same TorchTrainer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, absolute_path
from pipeline.train.context import LocalContext
from pipeline.train.loop import run_dir_for, train_loop
from pipeline.train.outputs import read_metrics


@dataclass
class Summary:
    name: str
    run_dir: Path
    epochs: int
    best_test_accuracy: float
    last_images_per_s: float
    checkpoint: str | None = None

    def line(self) -> str:
        acc = self.best_test_accuracy
        return (
            f"[capsnet] done: {self.name}: {self.epochs} epochs, best test accuracy "
            f"{acc:.4f} (error {100 * (1 - acc):.2f}%), {self.last_images_per_s:.0f} img/s; "
            f"outputs in {self.run_dir}"
        )


def resolve_use_gpu(setting: bool | str) -> bool:
    """auto: GPUs if the connected Ray cluster has any (or, before Ray starts, this machine)."""
    if setting != "auto":
        return bool(setting)
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except ImportError:
        pass
    import torch

    return torch.cuda.is_available()


def build_trainer(
    cfg: RunConfig,
    *,
    storage_path: str | None = None,
    name: str | None = None,
    config_dict: dict[str, Any] | None = None,
    callbacks: list | None = None,
):
    """The TorchTrainer for this run (used by `capsnet train` and by every Tune trial)."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    use_gpu = resolve_use_gpu(cfg.run.use_gpu)
    return TorchTrainer(
        train_loop,
        train_loop_config=config_dict or cfg.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker},
        ),
        run_config=RayRunConfig(
            name=name or cfg.run.name,
            storage_path=storage_path or absolute_path(cfg.run.storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute="test_accuracy",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=callbacks,
        ),
    )


def init_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Join RAY_ADDRESS's cluster if set, else start Ray embedded in this process.

    `dashboard=True` for Tune: Ray Train V2 frees the placement group of a trial that Tune
    stops (ASHA) through the state API, which the dashboard serves; without it the resources
    of stopped trials leak and later trials wait forever for CPUs/GPUs.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": always a fresh embedded instance, never whatever cluster another
        # `ray start` left on this machine (that is what RAY_ADDRESS is for). Loopback only.
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )


def summarize(cfg: RunConfig) -> Summary:
    run_dir = run_dir_for(cfg)
    rows = read_metrics(run_dir)
    best = max((r["test_accuracy"] for r in rows), default=float("nan"))
    last = rows[-1] if rows else {}
    ckpt = run_dir / "checkpoints" / "best" / "checkpoint.pt"
    return Summary(
        name=cfg.run.name,
        run_dir=run_dir,
        epochs=int(last.get("epoch", 0)),
        best_test_accuracy=best,
        last_images_per_s=float(last.get("images_per_s", 0.0)),
        checkpoint=str(ckpt) if ckpt.is_file() else None,
    )


def train(cfg: RunConfig, *, local: bool = False) -> Summary:
    """Run `capsnet train`: the TorchTrainer on Ray (default) or the same loop in-process."""
    cfg = with_absolute_paths(cfg)
    from pipeline.data import load_dataset_info

    load_dataset_info(cfg.data.shards)  # a missing/unreadable dataset fails before Ray starts
    if local:  # the same loop in this process, rank 0 of 1
        train_loop(cfg.to_dict(), LocalContext(run_dir_for(cfg)))
        return summarize(cfg)
    init_ray(num_cpus=None if os.environ.get("RAY_ADDRESS") else _local_cpus(cfg))
    result = build_trainer(cfg).fit()
    if result.error is not None:
        raise result.error
    summary = summarize(cfg)
    if result.metrics and summary.epochs == 0:  # remote storage: metrics came back via Ray only
        summary.epochs = int(result.metrics.get("epoch", 0))
        summary.best_test_accuracy = float(result.metrics.get("best_test_accuracy", float("nan")))
        summary.last_images_per_s = float(result.metrics.get("images_per_s", 0.0))
    return summary


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local paths resolved against the driver's working directory: Ray workers run elsewhere."""
    return cfg.replace(
        data={"shards": absolute_path(cfg.data.shards)},
        run={
            "storage_path": absolute_path(cfg.run.storage_path),
            "resume_from": absolute_path(cfg.run.resume_from),
        },
    )


def _local_cpus(cfg: RunConfig) -> int:
    """Enough CPUs for the requested workers, at least what the machine has."""
    return max(os.cpu_count() or 1, cfg.run.num_workers * cfg.run.cpus_per_worker + 1)
