"""Train state and checkpoints: `TrainState.save` / `TrainState.restore` are one symmetric pair.

A checkpoint is one `checkpoint.pt` per folder, loadable with torch.load(weights_only=True):
model state_dict (unwrapped from DDP / torch.compile), optimizer, scheduler, grad scaler, the
next epoch to run, the best test accuracy so far, torch + python RNG states, the run config,
the model's family and config, and the epoch's metrics.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from capscore import build_model, config_from_dict, model_kind
from pipeline.config import TrainSection
from pipeline.torch_utils import unwrap
from pipeline.train.context import CHECKPOINT_FILE


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
    """Read a checkpoint.pt (or a folder holding one) safely: tensors and plain data only."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the model a checkpoint was trained with (the one builder) and load its weights."""
    model = build_model(config_from_dict(ckpt["model_kind"], ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model


def copy_checkpoint(src: Path, dst_folder: Path) -> None:
    dst_folder.mkdir(parents=True, exist_ok=True)
    tmp = dst_folder / (CHECKPOINT_FILE + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst_folder / CHECKPOINT_FILE)
