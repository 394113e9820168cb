"""What the loader hands to training, evaluation and the report: one typed batch.

The loader ships pixels as uint8 with each sample's pending ±2 px shift; `Batch.to(device)`
moves them and finishes the batch there in one batched op (shift, then scale to float32 in
[0, 1]). Four times fewer bytes cross from loader workers and to the GPU, and the per-pixel
work runs where it is cheapest. Every consumer calls `.to(device)` before reading pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from pipeline.data.augment import shift_tensor


@dataclass
class Batch:
    """One batch. After `.to(device)`: images float32 in [0, 1], shifted; parts likewise.

    Multi-object datasets (MultiMNIST) also carry each object's own image and class, which
    the CapsNet loss reconstructs one by one from each object's capsule.
    """

    images: torch.Tensor
    """[B, C, H, W] inputs: uint8 as the loader yields them, float32 in [0, 1] after `.to`."""
    labels: torch.Tensor
    """[B] int64 class indices, or [B, J] float32 multi-hot."""
    parts: torch.Tensor | None = None
    """[B, K, C, H, W] each object's own image (None for single-object data), as `images`."""
    part_classes: torch.Tensor | None = None
    """[B, K] int64 the class of each object in `parts`."""
    shifts: torch.Tensor | None = None
    """[B, 2] int64 (dy, dx) each sample (and its parts) still has to move by; None after
    `.to`, and for unaugmented batches."""
    max_shift: int = 0
    """Bound on |dy|, |dx| in `shifts`."""

    def __len__(self) -> int:
        return len(self.images)

    @property
    def ready(self) -> bool:
        """Float pixels with no shift pending (what `.to` returns)."""
        return self.shifts is None and self.images.is_floating_point()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """This batch on `device`, finished: shifted, float32 in [0, 1]."""
        moved = replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )
        return moved._finished()

    def _finished(self) -> Batch:
        if self.ready and (self.parts is None or self.parts.is_floating_point()):
            return self
        images, parts = self.images, self.parts
        if self.shifts is not None:
            images = shift_tensor(images, self.shifts, self.max_shift)
            if parts is not None:  # the same offset per sample moves each of its parts
                B, K, C, H, W = parts.shape
                flat = shift_tensor(parts.reshape(B, K * C, H, W), self.shifts, self.max_shift)
                parts = flat.view(B, K, C, H, W)
        return replace(self, images=_as_float(images), parts=_as_float(parts), shifts=None)

    def split(self, size: int) -> list[Batch]:
        """Consecutive batches of `size` rows (the last may be smaller), as views."""
        if len(self) <= size:
            return [self]
        tensors = [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]
        return [
            replace(self, **{name: getattr(self, name)[start : start + size] for name in tensors})
            for start in range(0, len(self), size)
        ]

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) on each batch."""
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).pin_memory()
                for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )


def _as_float(pixels: torch.Tensor | None) -> torch.Tensor | None:
    if pixels is None or pixels.is_floating_point():
        return pixels
    return pixels.to(torch.float32).div_(255.0)
