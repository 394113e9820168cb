"""Every PNG the pipeline writes, set up in one place (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def _image(img: torch.Tensor):
    img = img.detach().float().cpu()
    return (img[0] if img.shape[0] == 1 else img.permute(1, 2, 0).clamp(0, 1)).numpy()


def save_reconstructions(
    images: torch.Tensor,
    reconstructions: torch.Tensor,
    path: Path,
    predicted: torch.Tensor | None = None,
) -> None:
    """Inputs (top row) above their reconstructions (bottom row)."""
    plt = _pyplot()
    n = images.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.6), squeeze=False)
    for k in range(n):
        for row, batch in enumerate((images, reconstructions)):
            ax = axes[row][k]
            ax.imshow(_image(batch[k]), cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
        if predicted is not None:
            axes[1][k].set_title(f"pred {int(predicted[k])}", fontsize=7)
    axes[0][0].set_title("input", fontsize=7, loc="left")
    _save(fig, path)


def save_confusion(matrix: torch.Tensor, path: Path, title: str = "") -> None:
    """Counts, rows = true class, columns = predicted."""
    plt = _pyplot()
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
    _save(fig, path)


def save_search_plot(
    rows: Sequence[dict[str, Any]], metric: str, axes_keys: Sequence[str], path: Path
) -> None:
    """A search's best metric against each of `axes_keys`, one point per trial (orange:
    stopped early)."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(axes_keys), figsize=(4.5 * len(axes_keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], axes_keys, strict=True):
        xs = [r[key] for r in rows]
        ys = [r[metric] for r in rows]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        labels = sorted({str(x) for x in xs})
        positions = xs if numeric else [labels.index(str(x)) for x in xs]
        colors = ["tab:orange" if r["stopped_early"] else "tab:blue" for r in rows]
        ax.scatter(positions, ys, c=colors)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        elif all(float(x).is_integer() for x in xs):
            ax.set_xticks(sorted(set(xs)))
        if key.endswith("lr"):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].set_title("blue: ran all epochs, orange: stopped early", fontsize=8)
    _save(fig, path)
