"""Checkpoints: one `checkpoint.pt` per folder, loadable with torch.load(weights_only=True).

Contents: model state_dict (unwrapped from DDP / torch.compile), optimizer, scheduler, scaler,
the next epoch to run, torch + python RNG states, the resolved run config and model config,
and the epoch's metrics.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from capscore import MODELS
from pipeline.train.context import CHECKPOINT_FILE


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):          # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):     # torch.compile
            model = model._orig_mod
        else:
            return model


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


def save_checkpoint(folder: Path, *, model, optimizer, scheduler, scaler, next_epoch: int,
                    run_config: dict, model_kind: str, model_config, metrics: dict) -> Path:
    """Write folder/checkpoint.pt atomically (a crash never leaves a half-written file)."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "next_epoch": next_epoch,
        "rng": rng_state(),
        "run_config": run_config,
        "model_kind": model_kind,
        "model_config": asdict(model_config),
        "metrics": metrics,
    }
    tmp = folder / (CHECKPOINT_FILE + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(folder / CHECKPOINT_FILE)
    return folder / CHECKPOINT_FILE


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint.pt (or a folder holding one) safely: tensors and plain data only."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the model a checkpoint was trained with and load its weights."""
    model_cls, config_cls = MODELS[ckpt["model_kind"]]
    config = dict(ckpt["model_config"])
    for key, value in config.items():  # tuples come back as lists through some serialisers
        if isinstance(value, list):
            config[key] = tuple(value)
    model = model_cls(config_cls(**config))
    model.load_state_dict(ckpt["model"])
    return model


def copy_checkpoint(src: Path, dst_folder: Path) -> None:
    dst_folder.mkdir(parents=True, exist_ok=True)
    tmp = dst_folder / (CHECKPOINT_FILE + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst_folder / CHECKPOINT_FILE)
