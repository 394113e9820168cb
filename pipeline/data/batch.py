"""What the loader hands to training, evaluation and the report: one typed batch."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Batch:
    """One batch. Images are float32 in [0, 1].

    Multi-object datasets (MultiMNIST) also carry each object's own image and class, which
    the CapsNet loss reconstructs one by one from each object's capsule.
    """

    images: torch.Tensor
    """[B, C, H, W] inputs."""
    labels: torch.Tensor
    """[B] int64 class indices, or [B, J] float32 multi-hot."""
    parts: torch.Tensor | None = None
    """[B, K, C, H, W] each object's own image (None for single-object data)."""
    part_classes: torch.Tensor | None = None
    """[B, K] int64 the class of each object in `parts`."""

    def __len__(self) -> int:
        return len(self.images)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(
            self,
            images=move(self.images),
            labels=move(self.labels),
            parts=move(self.parts),
            part_classes=move(self.part_classes),
        )

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) on each batch."""

        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return replace(
            self,
            images=pin(self.images),
            labels=pin(self.labels),
            parts=pin(self.parts),
            part_classes=pin(self.part_classes),
        )
