"""Train state and checkpoints: `TrainState.save` / `TrainState.restore` are one symmetric pair.

A checkpoint is one `checkpoint.pt` per folder, loadable with torch.load(weights_only=True):
model state_dict (unwrapped from DDP / torch.compile), optimizer, scheduler, grad scaler, the
next epoch to run, the best test accuracy so far, torch + python RNG states, the run config,
the model's family and config, and the epoch's metrics.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from capscore import build_model, config_from_dict, model_kind
from pipeline.config import TrainSection
from pipeline.torch_utils import unwrap
from pipeline.train.context import CHECKPOINT_FILE


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and why."""


@dataclass
class TrainState:
    """Everything that changes while training, and what a resume must restore."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    """Always present; enabled only for fp16 (a disabled scaler is a no-op)."""
    next_epoch: int = 0
    best_accuracy: float = -1.0

    @classmethod
    def create(
        cls, model: torch.nn.Module, train: TrainSection, device: torch.device
    ) -> TrainState:
        """Adam with per-step exponential decay: lr * lr_decay ** (step / lr_decay_steps)."""
        optimizer = torch.optim.Adam(
            model.parameters(), lr=train.lr, weight_decay=train.weight_decay
        )
        decay, every = train.lr_decay, train.lr_decay_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: decay ** (step / every)
        )
        scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16")
        return cls(model, optimizer, scheduler, scaler)

    def save(self, folder: Path, *, run_config: dict[str, Any], metrics: dict[str, Any]) -> Path:
        """Write folder/checkpoint.pt atomically (a crash never leaves a half-written file)."""
        model = unwrap(self.model)
        payload = {
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "next_epoch": self.next_epoch,
            "best_accuracy": self.best_accuracy,
            "rng": rng_state(),
            "run_config": run_config,
            "model_kind": model_kind(model.config),
            "model_config": asdict(model.config),
            "metrics": metrics,
        }
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (CHECKPOINT_FILE + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(folder / CHECKPOINT_FILE)
        return folder / CHECKPOINT_FILE

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Load what `save` wrote (the model before it is moved/wrapped, or unwrapped)."""
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # {} from a run without fp16
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.next_epoch = ckpt["next_epoch"]
        self.best_accuracy = ckpt.get("best_accuracy", -1.0)

    def retune(self, train: TrainSection) -> None:
        """Apply this run config's lr, decay and weight decay to a restored optimizer (a no-op
        unless a resume was allowed to change them): the schedule continues from its step."""
        for group in self.optimizer.param_groups:
            group["initial_lr"] = train.lr
            group["weight_decay"] = train.weight_decay
        self.scheduler.base_lrs = [train.lr] * len(self.optimizer.param_groups)
        step = self.scheduler.last_epoch  # the schedule goes on from the restored step
        for group, factor in zip(
            self.optimizer.param_groups, self.scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = train.lr * factor(step)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint.pt (or a folder holding one) safely: tensors and plain data only.

    A file that is not a usable checkpoint raises CheckpointError; an error reading it from
    storage raises OSError (naming the file), which is not a reason to use another one."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:  # the storage's error (EIO, EACCES, a stale mount), not the file's
        why = f"{type(err).__name__}: {err.strerror or err}"
        message = f"cannot read checkpoint {path} ({why}); fix the storage and rerun"
        # OSError(errno, ...) builds the same subclass (PermissionError for EACCES, ...)
        raise (OSError(err.errno, message) if err.errno else OSError(message)) from err
    except Exception as err:  # truncated, empty, not a torch file, or unsafe to unpickle
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'})"
        ) from None
    keys = ("model", "model_kind", "model_config", "next_epoch")
    missing = [k for k in keys if k not in ckpt] if isinstance(ckpt, dict) else list(keys)
    if missing:
        raise CheckpointError(f"{path}: not a capsnet checkpoint (missing {missing})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the model a checkpoint was trained with (the one builder) and load its weights."""
    model = build_model(config_from_dict(ckpt["model_kind"], ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model


# --- the run's kept checkpoints ---------------------------------------------------------------

INDEX_FILE = "checkpoints.json"


CHECKPOINT_PREFIX = "checkpoint_epoch-"


def checkpoint_name(epoch: int) -> str:
    """The folder of the checkpoint taken after `epoch` epochs (1-based), in the run folder."""
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def upload_rank(relpath: str) -> int:
    """Where a run-folder file goes in an upload: 0 everything else (metrics first), 1 the
    checkpoint folders, 2 the index last, so the bucket's index never names a checkpoint that
    is not there and no checkpoint is newer than the metrics beside it."""
    if relpath == INDEX_FILE:
        return 2
    return 1 if relpath.startswith(CHECKPOINT_PREFIX) else 0


@dataclass
class CheckpointIndex:
    """`<run>/checkpoints.json`: which checkpoint folders the run keeps, and which is best/last.

    One copy per kept checkpoint: `best` and `last` are names in this file, not copies. The
    rule is Ray Train's own (CheckpointConfig num_to_keep by test accuracy, the latest always
    kept), so in Ray runs this index names exactly the folders Ray keeps; local runs delete
    what it drops themselves.
    """

    entries: dict[str, dict[str, float]]
    """name -> {"epoch": epochs done, "test_accuracy": ...}"""
    last: str | None = None

    @property
    def best(self) -> str | None:
        if not self.entries:
            return None
        return max(self.entries, key=self._rank)

    def _rank(self, name: str) -> tuple[bool, float, float]:
        """Ray Train's order (ray/train/_internal/checkpoint_manager.py: `_get_checkpoint_score`
        and `_insert_into_sorted_list`, which v2's manager also uses): NaN below every score,
        and on equal scores the newer checkpoint ranks higher."""
        entry = self.entries[name]
        accuracy = entry["test_accuracy"]
        if math.isnan(accuracy):
            return (False, -math.inf, entry["epoch"])
        return (True, accuracy, entry["epoch"])

    def add(self, name: str, epoch: int, test_accuracy: float, keep: int) -> list[str]:
        """Record a new checkpoint; returns the names that the keep rule drops."""
        self.entries[name] = {"epoch": epoch, "test_accuracy": test_accuracy}
        self.last = name
        ranked = sorted(self.entries, key=self._rank, reverse=True)
        kept = set(ranked[:keep]) | {name}
        dropped = [n for n in self.entries if n not in kept]
        for n in dropped:
            del self.entries[n]
        return dropped

    @classmethod
    def load(cls, run_dir: Path) -> CheckpointIndex:
        path = Path(run_dir) / INDEX_FILE
        if not path.is_file():
            return cls(entries={})
        data = json.loads(path.read_text())
        return cls(entries=data.get("checkpoints", {}), last=data.get("last"))

    def save(self, run_dir: Path) -> None:
        data = {"best": self.best, "last": self.last, "checkpoints": self.entries}
        tmp = Path(run_dir) / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(Path(run_dir) / INDEX_FILE)


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint.pt from a file, a checkpoint folder, or a run folder (its `which` one:
    best or last); `RUN/best` and `RUN/last` work too."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if (path / CHECKPOINT_FILE).is_file():
        return path / CHECKPOINT_FILE
    if path.name in ("best", "last") and (path.parent / INDEX_FILE).is_file():
        path, which = path.parent, path.name
    if (path / INDEX_FILE).is_file():
        name = getattr(CheckpointIndex.load(path), which)
        if name and (path / name / CHECKPOINT_FILE).is_file():
            return path / name / CHECKPOINT_FILE
        raise FileNotFoundError(f"{path / INDEX_FILE} names no {which} checkpoint that exists")
    raise FileNotFoundError(
        f"no checkpoint at {path}: give a checkpoint.pt, its folder, or a run folder "
        f"(with {INDEX_FILE}; RUN/best or RUN/last pick one)"
    )
