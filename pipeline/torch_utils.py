"""Small torch helpers shared by evaluation, training and the commands (no pipeline imports)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager:
    """The one place precision becomes an autocast context (fp32: none)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
