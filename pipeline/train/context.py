"""Where the worker loop runs: a Ray Train worker, or one plain local process.

The loop only talks to a ``WorkerContext``: rank, world size, device, checkpoint in/out and
metric reporting. ``RayContext`` maps these onto ``ray.train``; ``LocalContext`` onto a folder,
so the same loop runs (and can be debugged or profiled) without Ray, e.g. on GPU boxes where
Ray cannot be installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"
FATAL_KEY = "capsnet_fatal"
"""Metric key of a deterministic failure reported as a run's last result (not retried)."""


def staging_prefix(run_dir: Path) -> str:
    """Temp-folder prefix of one run's checkpoint staging, so that a rerun can find and remove
    what a kill left behind without touching another run's (co-tenants share /tmp)."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    return f"capsnet-ckpt-{digest}-"


class TrainingError(RuntimeError):
    """A run failed in a way a retry cannot fix (e.g. a non-finite loss)."""


FATAL_FILE = "fatal.json"
"""In the run folder: the deterministic error that ended the run's last attempt."""

LOG_FILE = "log.txt"
"""In the run folder: what the driver's console wrote (the driver writes it, then pushes it)."""


def write_fatal(run_dir: Path, error: Exception) -> None:
    """Write `<run_dir>/fatal.json` atomically (a temporary file renamed onto it): the driver
    reads it after a kill too, and must find the whole error or none."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"error": f"{type(error).__name__}: {error}"})
    tmp = run_dir / (FATAL_FILE + ".tmp")
    try:
        tmp.write_text(text + "\n")
        tmp.replace(run_dir / FATAL_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def read_fatal(run_dir: Path) -> str | None:
    path = run_dir / FATAL_FILE
    return json.loads(path.read_text())["error"] if path.is_file() else None


class WorkerContext:
    persists_checkpoints: bool = False
    """True when the runtime copies reported checkpoints to storage itself (Ray)."""
    world_rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False
    interactive: bool = False

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint.pt the runtime says to resume from, if any; the caller passes it to
        `release_checkpoint` once it has read it."""
        raise NotImplementedError

    def release_checkpoint(self, path: Path | None) -> None:
        """Done reading what `latest_checkpoint` returned (a download is removed)."""

    def checkpoint_folder(self, name: str, run_dir: Path) -> Path:
        """Where rank 0 writes the checkpoint `name` of the run in `run_dir` before reporting
        it."""
        raise NotImplementedError

    def clean_stale(self, run_dir: Path) -> list[Path]:
        """Remove what a killed earlier attempt of this run left half-written (a
        checkpoint.pt.tmp; staging folders): rank 0, before training."""
        stale = list(run_dir.glob(f"checkpoint_*/{CHECKPOINT_FILE}.tmp"))
        stale += Path(tempfile.gettempdir()).glob(f"{staging_prefix(run_dir)}*")
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return stale

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        """Publish one epoch's metrics (all ranks call this; rank 0 passes the checkpoint
        folder it wrote, named as `checkpoint_folder` said)."""
        raise NotImplementedError

    def delete_checkpoint(self, name: str) -> None:
        """Drop a checkpoint the keep rule no longer keeps (Ray does this itself)."""

    def fail(self, error: Exception) -> None:
        """End the run with a deterministic error (every rank calls this at the same point)."""
        raise error


class LocalContext(WorkerContext):
    """One process, rank 0 of 1; checkpoints are written in place in the run folder (the same
    layout as Ray's: <run_dir>/checkpoint_epoch-NNNN/checkpoint.pt)."""

    interactive = True

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def latest_checkpoint(self) -> Path | None:
        return None  # the loop finds the newest checkpoint in the run folder itself

    def checkpoint_folder(self, name: str, run_dir: Path) -> Path:
        return run_dir / name

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        pass  # metrics.jsonl and TensorBoard are written by the loop; the checkpoint is in place

    def delete_checkpoint(self, name: str) -> None:
        shutil.rmtree(self.run_dir / name, ignore_errors=True)


RESUME_PREFIX = "capsnet-resume-"
"""Temp folder of a checkpoint downloaded from object storage to resume from."""


class RayContext(WorkerContext):
    """A Ray Train V2 worker."""

    persists_checkpoints = True

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.world_rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.distributed = self.world_size > 1

    @property
    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def latest_checkpoint(self) -> Path | None:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        if checkpoint.filesystem.type_name == "local":
            return Path(checkpoint.path) / CHECKPOINT_FILE
        # Object storage (s3:// / gs://): download it once to a local folder.
        local = Path(tempfile.mkdtemp(prefix=RESUME_PREFIX))
        checkpoint.to_directory(str(local))
        return local / CHECKPOINT_FILE

    def release_checkpoint(self, path: Path | None) -> None:
        if path is not None and path.parent.name.startswith(RESUME_PREFIX):  # our download
            shutil.rmtree(path.parent, ignore_errors=True)

    def checkpoint_folder(self, name: str, run_dir: Path) -> Path:
        return Path(tempfile.mkdtemp(prefix=staging_prefix(run_dir))) / name

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        if checkpoint is None:
            self._train.report(metrics)
            return
        # Ray copies the folder to storage_path/name/<its name> (synchronously) and deletes the
        # local one: the persisted folder is the only copy.
        self._train.report(
            metrics,
            checkpoint=self._train.Checkpoint.from_directory(str(checkpoint)),
            checkpoint_dir_name=checkpoint.name,
            delete_local_checkpoint_after_upload=True,
        )
        shutil.rmtree(checkpoint.parent, ignore_errors=True)  # the mkdtemp parent

    def delete_checkpoint(self, name: str) -> None:
        pass  # CheckpointConfig(num_to_keep) applies the same rule to Ray's copies

    def fail(self, error: Exception) -> None:
        # Returning normally (rank 0 has written fatal.json for the driver): a raised error
        # would be a worker failure, which Ray retries up to max_failures times, failing the
        # same way. The report tells Tune, whose trial result is the last report.
        self._train.report({FATAL_KEY: f"{type(error).__name__}: {error}"})


def in_ray_worker() -> bool:
    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        return True
    except Exception:
        return False


def limit_threads_to_env() -> None:
    """Keep BLAS threads to the CPUs Ray gave this worker (Ray sets OMP_NUM_THREADS)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(int(threads))
