"""Where the worker loop runs: a Ray Train worker, or one plain local process.

The loop only talks to a ``WorkerContext``: rank, world size, device, checkpoint in/out and
metric reporting. ``RayContext`` maps these onto ``ray.train``; ``LocalContext`` onto a folder,
so the same loop runs (and can be debugged or profiled) without Ray, e.g. on GPU boxes where
Ray cannot be installed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"


class WorkerContext:
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
        """The checkpoint.pt to resume from, if the run has one."""
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Publish one epoch's metrics (all ranks call this; rank 0 passes the checkpoint).

        `checkpoint_dir` is a staging folder the caller deletes once this returns."""
        raise NotImplementedError


class LocalContext(WorkerContext):
    """One process, rank 0 of 1; checkpoints live in <run_dir>/checkpoints/."""

    interactive = True

    def __init__(self, run_dir: Path):
        self.ckpt_dir = Path(run_dir) / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        last = self.ckpt_dir / "last" / CHECKPOINT_FILE
        return last if last.is_file() else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        pass  # metrics.jsonl, TensorBoard and best/last copies are written by the loop itself


class RayContext(WorkerContext):
    """A Ray Train V2 worker."""

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
        local = Path(tempfile.mkdtemp(prefix="capsnet-resume-"))
        checkpoint.to_directory(str(local))
        return local / CHECKPOINT_FILE

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir))
        self._train.report(metrics, checkpoint=checkpoint)  # uploads synchronously


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
