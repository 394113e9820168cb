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
    """Inputs (top row) above their reconstructions (bottom row), labelled with the predicted
    class; one tiled image (`save_image_grid`), cheap enough to draw with every checkpoint."""
    labels = [f"pred {int(p)}" for p in predicted] if predicted is not None else []
    save_image_grid(
        torch.stack([images, reconstructions.view_as(images)]),
        path,
        row_labels=["input", "recon"],
        col_labels=labels,
    )


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


# --- capsnet report (issue 12) ----------------------------------------------------------------

GRID_CELL_IN = 0.6
"""Side of one image cell of `save_image_grid`, in inches (60 px at the saved 100 dpi)."""
GRID_LABEL_IN = (0.9, 0.45)
"""Room for the row labels (left) and the column labels plus title (top), in inches."""


def image_grid_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG `save_image_grid` writes for a rows x cols grid."""
    w = GRID_LABEL_IN[0] + GRID_CELL_IN * cols
    h = GRID_LABEL_IN[1] + GRID_CELL_IN * rows
    return round(100 * w), round(100 * h)


def save_image_grid(
    images_RN: torch.Tensor,
    path: Path,
    row_labels: Sequence[str] = (),
    col_labels: Sequence[str] = (),
    title: str = "",
) -> None:
    """Images [R, N, C, H, W] (values in [0, 1]) as R rows of N; size `image_grid_size`.

    The grid is tiled into one picture (a 1 px grey line between cells) and drawn with one
    imshow: a grid of R x N axes takes seconds to lay out, this a fraction of one."""
    plt = _pyplot()
    R, N, C, H, W = images_RN.shape
    cells = images_RN.detach().float().cpu().clamp(0, 1)
    tiled = torch.full((C, R * (H + 1) + 1, N * (W + 1) + 1), 0.5)
    for r in range(R):
        for n in range(N):
            y, x = 1 + r * (H + 1), 1 + n * (W + 1)
            tiled[:, y : y + H, x : x + W] = cells[r, n]
    w, h = image_grid_size(R, N)
    fig = plt.figure(figsize=(w / 100, h / 100))
    left, top = GRID_LABEL_IN[0] * 100 / w, GRID_LABEL_IN[1] * 100 / h
    ax = fig.add_axes((left, 0.0, 1 - left, 1 - top))
    ax.imshow(_image(tiled), cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks([1 + r * (H + 1) + H / 2 for r in range(len(row_labels))], list(row_labels))
    ax.set_xticks([1 + n * (W + 1) + W / 2 for n in range(len(col_labels))], list(col_labels))
    ax.xaxis.tick_top()
    ax.tick_params(length=0, labelsize=6)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.text(0.5, 1 - 0.3 * top, title, ha="center", va="center", fontsize=8)
    fig.savefig(path, dpi=100)  # no tight_layout: the axes are placed by hand, size is exact
    plt.close(fig)


def save_equivariance(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """R² per transform (groups) and model (bars), each bar's chance level as a black tick.
    rows: {"model", "kind", "r2", "chance_r2"}."""
    plt = _pyplot()
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1.5 + 1.4 * len(kinds), 3.2))
    for m, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        xs = [kinds.index(r["kind"]) - 0.4 + width * (m + 0.5) for r in mine]
        ax.bar(xs, [r["r2"] for r in mine], width * 0.9, color=f"C{m}", label=model)
        for x, r in zip(xs, mine, strict=True):
            ax.plot([x - width * 0.45, x + width * 0.45], [r["chance_r2"]] * 2, color="black")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylim(0, 1)
    ax.set_ylabel("R² of the linear fit")
    ax.set_title("pose equivariance (black: chance R²)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def save_binned_accuracy(
    curves: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], path: Path
) -> None:
    """One panel per parameter: accuracy against the bin centres, one line per model.
    curves: {parameter: {model: (bin centres, accuracies)}}."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    for ax, (parameter, lines) in zip(axes[0], curves.items(), strict=True):
        for m, (model, (xs, ys)) in enumerate(lines.items()):
            ax.plot(xs, ys, marker="o", color=f"C{m}", label=model)
        ax.set_xlabel(parameter)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def save_couplings(
    images: torch.Tensor,
    maps_SJGG: torch.Tensor,
    path: Path,
    class_names: Sequence[str],
) -> None:
    """Per input (row): the image, then per class the couplings c_ij averaged over primary
    capsule types, as a heat map over the primary grid (one colour scale for the figure).
    Each column is tiled into one picture, so the figure is two imshows, not S x (J + 1)."""
    plt = _pyplot()
    S, J, G, _ = maps_SJGG.shape
    maps = maps_SJGG.detach().float().cpu()
    tiled = torch.full((S * (G + 1) - 1, J * (G + 1) - 1), float("nan"))  # nan: blank gaps
    for s in range(S):
        for j in range(J):
            tiled[s * (G + 1) : s * (G + 1) + G, j * (G + 1) : j * (G + 1) + G] = maps[s, j]
    fig, (ax_in, ax_maps) = plt.subplots(
        1, 2, figsize=(1.2 + 0.75 * J, 0.8 + 0.75 * S), width_ratios=(1, J)
    )
    # Both panels in grid units (row s spans [s (G + 1), s (G + 1) + G]), so every input sits
    # level with its maps whatever the image and grid sizes.
    height = S * (G + 1) - 1
    for s in range(S):
        top = s * (G + 1)
        ax_in.imshow(_image(images[s]), cmap="gray", vmin=0, vmax=1, extent=(0, G, top + G, top))
    ax_in.set_xlim(0, G)
    ax_in.set_ylim(height, 0)
    ax_in.set_aspect("auto")
    ax_in.axis("off")
    lo, hi = float(maps.min()), float(maps.max())
    if hi - lo < 1e-4:  # (near) uniform couplings: a flat field, not float jitter magnified
        lo, hi = lo - 1e-3, hi + 1e-3
    shown = ax_maps.imshow(
        tiled.numpy(),
        cmap="viridis",
        vmin=lo,
        vmax=hi,
        interpolation="nearest",
        aspect="auto",
        extent=(0, J * (G + 1) - 1, height, 0),
    )
    ax_maps.set_xticks([j * (G + 1) + G / 2 for j in range(J)], list(class_names[:J]))
    ax_maps.xaxis.tick_top()
    ax_maps.set_yticks([])
    ax_in.set_title("input", fontsize=7)
    ax_maps.tick_params(length=0, labelsize=7)
    bar = fig.colorbar(shown, ax=ax_maps, fraction=0.02, pad=0.01)
    bar.ax.ticklabel_format(useOffset=False)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle("coupling c_ij per class, mean over primary capsule types", fontsize=8)
    _save(fig, path)
