"""What a user looks at in a run folder: metrics.jsonl, TensorBoard events, PNG figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class RunLog:
    """Rank 0's writer for metrics.jsonl and TensorBoard (no-op on other ranks)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self._tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency; stay usable without it
                self._tb = None

    def epoch(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics, sort_keys=True) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, metrics["epoch"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_reconstructions(images: torch.Tensor, reconstructions: torch.Tensor, path: Path,
                         predicted: torch.Tensor | None = None) -> None:
    """Inputs (top row) above their reconstructions (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.6), squeeze=False)
    for k in range(n):
        for row, batch in enumerate((images, reconstructions)):
            img = batch[k].detach().float().cpu()
            ax = axes[row][k]
            ax.imshow((img[0] if img.shape[0] == 1 else img.permute(1, 2, 0).clamp(0, 1)).numpy(),
                      cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
        if predicted is not None:
            axes[1][k].set_title(f"pred {int(predicted[k])}", fontsize=7)
    axes[0][0].set_title("input", fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_confusion(matrix: torch.Tensor, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    J = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(1 + 0.5 * J, 1 + 0.5 * J))
    ax.imshow(matrix.numpy(), cmap="Blues")
    for t in range(J):
        for p in range(J):
            ax.text(p, t, int(matrix[t, p]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(J))
    ax.set_yticks(range(J))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
