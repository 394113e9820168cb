"""What a user reads in a run folder: metrics.jsonl and TensorBoard events (PNGs: figures.py)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.schema import flatten

TRACKERS = ("tensorboard", "wandb", "mlflow")
"""`run.report_to` choices; wandb and mlflow are optional installs (extra `trackers`)."""


class RunLog:
    """Rank 0's writer for metrics.jsonl and the trackers of `run.report_to` (no-op on other
    ranks). TensorBoard: per-step loss and lr (every log_every steps), every epoch metric, the
    reconstructions figure. W&B and MLflow go through Ray's setup_wandb / setup_mlflow, which
    also work in a --local run; both resume the same tracker run when the run resumes."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        *,
        report_to: tuple[str, ...] | list[str] = ("tensorboard",),
        name: str = "",
        config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.run_dir = run_dir
        self._tb = self._wandb = self._mlflow = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in report_to:
            from ray.air.integrations.wandb import setup_wandb

            self._wandb = setup_wandb(
                config=config or {},
                project=os.environ.get("WANDB_PROJECT", "capsnet"),
                trial_id=_tracker_id(name, run_dir),
                trial_name=name,
                dir=str(run_dir),
                rank_zero_only=False,  # only rank 0 builds a RunLog that is enabled
            )
        if "mlflow" in report_to:
            from ray.air.integrations.mlflow import setup_mlflow

            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:  # a file store in the run folder (MLflow 3 asks to opt in to it)
                uri = (run_dir / "mlruns").as_uri()
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self._mlflow = setup_mlflow(
                config=flatten(config or {}),
                tracking_uri=uri,
                experiment_name="capsnet",
                run_name=name,
                create_experiment_if_not_exists=True,
                rank_zero_only=False,
            )

    def step(self, step: int, values: dict[str, float]) -> None:
        """Scalars at a global optimizer step (loss, lr): called every log_every steps."""
        if not self.enabled:
            return
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"step/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"step/{k}": v for k, v in values.items()}, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({f"step_{k}": v for k, v in values.items()}, step=step)

    def image(self, tag: str, png: Path, epoch: int) -> None:
        """A figure the run wrote (e.g. reconstructions.png), as an image at this epoch."""
        if not self.enabled or not png.is_file():
            return
        if self._tb is not None:
            import matplotlib.image

            self._tb.add_image(tag, matplotlib.image.imread(png)[..., :3], epoch, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(str(png))}, commit=False)
        if self._mlflow is not None:
            self._mlflow.log_artifact(str(png), artifact_path=f"figures/epoch-{epoch:04d}")

    def resume(self, epochs_done: int, checkpoint_metrics: dict[str, Any]) -> None:
        """Make metrics.jsonl hold exactly epochs 1..epochs_done before training goes on.

        Rows of epochs after the checkpoint (trained, then lost with a kill) are dropped; the
        checkpoint's own row is added back if the kill came before it was written."""
        if not self.enabled:
            return
        rows = [r for r in read_metrics(self.run_dir) if r.get("epoch", 0) <= epochs_done]
        if checkpoint_metrics.get("epoch") == epochs_done and (
            not rows or rows[-1].get("epoch") != epochs_done
        ):
            rows.append(checkpoint_metrics)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        tmp = self.run_dir / "metrics.jsonl.tmp"
        tmp.write_text(text)
        tmp.replace(self.run_dir / "metrics.jsonl")

    def epoch(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics, sort_keys=True) + "\n")
        scalars = {
            k: v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        epoch = metrics["epoch"]
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, epoch)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"epoch/{k}": v for k, v in scalars.items()})
        if self._mlflow is not None:
            self._mlflow.log_metrics(scalars, step=epoch)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()
        self._tb = self._wandb = self._mlflow = None


def _tracker_id(name: str, run_dir: Path) -> str:
    """A stable id per run (name + folder), so a resumed run continues its tracker run."""
    digest = hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of `<run_dir>/metrics.jsonl`. A last line that does not parse is a row a kill
    tore mid-write (rows are appended): it is dropped with a warning, and the next resume
    rewrites the file without it. A bad line before the last raises ValueError naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for n, line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n != lines[-1][0]:
                raise ValueError(f"{path}: line {n} is not a metrics row ({err})") from None
            print(
                f"[capsnet] warning: {path}: dropping its last line, a row cut short by a kill "
                f"({len(line)} characters: {line[:40]!r}...)",
                flush=True,
            )
    return rows
