"""What `capsnet report` measures, one function per section (issue 12); no files written here.

Shape legend: B batch, S the few samples shown, J class capsules, D class pose dimension,
O perturbation offsets, K objects per image, I primary capsules (= T types x G x G grid),
C/H/W image channels and side.

Every function takes models in eval mode and tensors already on the model's device
(`take_samples` and `batches` move each Batch with `.to(device)`, the loader's contract).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from capscore import ROUTINGS, CapsNet
from pipeline.data import Batch, DataError, DatasetInfo, urls
from pipeline.data.tario import iter_samples
from pipeline.evaluate import align_predictions, correct_predictions
from pipeline.report.measures import (
    PARAM_NAMES,
    EquivarianceResult,
    FeaturesFn,
    pose_equivariance,
)

PERTURBATION_OFFSETS = tuple(round(-0.25 + 0.05 * k, 2) for k in range(11))
"""The paper's Fig. 4: each pose dimension moved over [-0.25, 0.25] in steps of 0.05."""

TRANSFORMS: dict[str, tuple[float, ...]] = {
    "shift": (-2, -1, 0, 1, 2),  # the 5 x 5 grid of (dx, dy) in pixels
    "rotation": (-30, -20, -10, 0, 10, 20, 30),  # degrees
    "scale": (0.8, 0.9, 1.0, 1.1, 1.2),
}
"""The known transforms of the equivariance section and their magnitudes (identity included)."""

ROUTING_ITERATIONS = (1, 2, 3, 4, 5)
AFFINE_PARAMETERS = ("rotation_deg", "shear")
"""The affine test parameters accuracy is binned by (stored per sample in its `json` field)."""
AFFINE_BINS = 4


# --------------------------------------------------------------------------- reading samples


def batches(loader: Iterable[Batch], device: torch.device, limit: int = 0) -> Iterator[Batch]:
    """The loader's batches on `device`, cut so that at most `limit` samples come (0: all)."""
    seen = 0
    for batch in loader:
        batch = batch.to(device)
        if limit and seen + len(batch) > limit:
            batch = head(batch, limit - seen)
        seen += len(batch)
        if len(batch):
            yield batch
        if limit and seen >= limit:
            return


def take_samples(loader: Iterable[Batch], device: torch.device, n: int) -> Batch:
    """The first n samples of the loader as one Batch on `device`."""
    got = list(batches(loader, device, n))
    if not got:
        raise DataError("the test split yielded no samples")
    return dataclasses.replace(
        got[0],
        **{name: torch.cat([getattr(b, name) for b in got]) for name in _tensor_fields(got[0])},
    )


def head(batch: Batch, n: int) -> Batch:
    """The first n samples of a batch."""
    return dataclasses.replace(
        batch, **{name: getattr(batch, name)[:n] for name in _tensor_fields(batch)}
    )


def _tensor_fields(batch: Batch) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    ]


def sample_metadata(info: DatasetInfo, split: str, limit: int = 0) -> list[dict[str, Any]]:
    """The `json` field of the split's samples in shard order (the order an evaluation loader
    with one process yields them), each with its `cls` label added; at most `limit` (0: all)."""
    out: list[dict[str, Any]] = []
    for url in info.shard_urls(split):
        stream = urls.open_stream(url)
        try:
            for key, fields in iter_samples(urls.raw_reader(stream)):
                if "json" not in fields:
                    raise DataError(f"{url}: sample {key} has no json field")
                meta = json.loads(fields["json"])
                if "cls" in fields:
                    meta["cls"] = int(fields["cls"])
                out.append(meta)
                if limit and len(out) >= limit:
                    return out
        finally:
            stream.close()
    return out


# --------------------------------------------------------------------------- capsule pictures


@torch.no_grad()
def reconstruct_predicted(model: nn.Module, images: torch.Tensor):
    """(reconstructions [B, C, H, W] from the longest capsule, predicted classes [B])."""
    out = model(images)
    return out.reconstructions, out.scores.argmax(1)


@torch.no_grad()
def perturb_dimensions(
    model: nn.Module, images_SCHW: torch.Tensor, offsets: Sequence[float] = PERTURBATION_OFFSETS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoded [S, D, O, C, H, W], winners [S]): image s decoded from its winning capsule
    with pose dimension d moved by offsets[o] (all other dimensions and capsules as they are;
    the decoder sees the winner only, as at test time)."""
    out = model(images_SCHW)
    v_SJD, winner_S = out.poses, out.scores.argmax(1)
    S, J, D = v_SJD.shape
    O = len(offsets)
    offset_O = torch.tensor(offsets, dtype=v_SJD.dtype, device=v_SJD.device)
    delta_DOD = (
        torch.eye(D, dtype=v_SJD.dtype, device=v_SJD.device)[:, None, :] * offset_O[None, :, None]
    )
    poses_SDOJD = v_SJD[:, None, None].expand(S, D, O, J, D).clone()
    poses_SDOJD[torch.arange(S), :, :, winner_S] += delta_DOD  # [S, D, O, D] at the winners
    mask_SJ = nn.functional.one_hot(winner_S, J).to(v_SJD.dtype)
    mask_NJ = mask_SJ[:, None, None].expand(S, D, O, J).reshape(-1, J)
    decoded = model.decoder(poses_SDOJD.reshape(-1, J, D), mask_NJ)
    return decoded.view(S, D, O, *decoded.shape[1:]), winner_S


@torch.no_grad()
def separate_objects(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstructions [B, K, C, H, W], classes [B, K]): each object decoded from its own
    predicted capsule, the K longest aligned to the true parts (`align_predictions`)."""
    out = model(batch.images)
    K = batch.part_classes.shape[1]
    aligned_BK = align_predictions(out.scores.topk(K, dim=1).indices, batch.part_classes)
    return model.reconstruct(out.poses, aligned_BK), aligned_BK


@torch.no_grad()
def coupling_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[S, J, G, G]: couplings c_ij of each primary grid position to each class, averaged over
    the T primary capsule types (PrimaryCapsules orders I as (type, row, column))."""
    c_SIJ = model(images).coupling.float()
    cfg = model.config
    S, _, J = c_SIJ.shape
    G, T = cfg.primary_grid, cfg.primary_types
    return c_SIJ.view(S, T, G, G, J).mean(1).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- measures


@dataclass
class ModelEquivariance:
    model: str
    """Which model ("CapsNet", "CNN (baseline)")."""
    result: EquivarianceResult


def equivariance(
    features: dict[str, FeaturesFn], images: torch.Tensor, batch_size: int
) -> list[ModelEquivariance]:
    """`pose_equivariance` of every model's features under every transform of TRANSFORMS."""
    return [
        ModelEquivariance(name, pose_equivariance(fn, images, kind, mags, batch_size=batch_size))
        for kind, mags in TRANSFORMS.items()
        for name, fn in features.items()
    ]


def transform_description(kind: str) -> str:
    mags = TRANSFORMS[kind]
    params = ", ".join(PARAM_NAMES[kind])
    if kind == "shift":
        return f"shift ({params}) over the {len(mags)}x{len(mags)} grid of {list(mags)} px"
    unit = " degrees" if kind == "rotation" else ""
    return f"{kind} ({params}) over {list(mags)}{unit}"


@dataclass
class IterationRow:
    iterations: int
    accuracy: float
    ms_per_batch: float
    """Mean wall time of one forward pass over a batch (after one warm-up pass)."""


def routing_iterations(model: CapsNet) -> int | None:
    """The iterations the CapsNet's routing was trained with, or None when its algorithm has
    no iterations setting (ROUTINGS says which)."""
    routing = model.config.routing
    return routing.iterations if ROUTINGS[routing.name].has_iterations else None


@torch.no_grad()
def routing_sweep(
    model: CapsNet, held: Sequence[Batch], iterations: Sequence[int] = ROUTING_ITERATIONS
) -> list[IterationRow]:
    """Accuracy and time per batch over `held` batches (in memory, on the device) with the
    routing run for each number of iterations at inference (the forward pass's
    `routing_iterations`: the model itself is left as it is)."""
    device = held[0].images.device
    model(held[0].images)  # warm-up: first-call allocations are not routing time
    rows = []
    for r in iterations:
        correct, total, seconds = 0, 0, 0.0
        for batch in held:
            _sync(device)
            start = time.perf_counter()
            scores = model(batch.images, routing_iterations=r).scores
            _sync(device)
            seconds += time.perf_counter() - start
            correct += int(correct_predictions(scores.float(), batch.labels).sum())
            total += len(batch)
        rows.append(IterationRow(r, correct / max(total, 1), 1000 * seconds / len(held)))
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- affine robustness


@dataclass
class AffineBin:
    parameter: str
    low: float
    high: float
    samples: int
    accuracy: dict[str, float]
    """Model name -> accuracy over the samples of this bin (nan when it holds none)."""


@dataclass
class AffineResult:
    samples: int
    accuracy: dict[str, float]
    """Model name -> accuracy over all `samples`."""
    bins: list[AffineBin] = field(default_factory=list)


@torch.no_grad()
def affine_robustness(
    models: dict[str, nn.Module],
    held: Iterable[Batch],
    metadata: Sequence[dict[str, Any]],
    ranges: dict[str, Sequence[float]],
) -> AffineResult:
    """Per-sample correctness of every model, binned by |parameter| over AFFINE_BINS equal
    bins of [0, max |range|] for each AFFINE_PARAMETERS. `metadata[n]` belongs to the n-th
    sample of `held` (checked against its label)."""
    correct: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    labels = []
    for batch in held:
        labels.append(batch.labels.cpu())
        for name, model in models.items():
            scores = model(batch.images).scores.float()
            correct[name].append(correct_predictions(scores, batch.labels).cpu())
    label_N = torch.cat(labels).numpy()
    if len(metadata) < len(label_N):
        raise DataError(f"{len(label_N)} samples read but only {len(metadata)} json fields")
    stored = np.array([m.get("cls", -1) for m in metadata[: len(label_N)]])
    if np.any((stored >= 0) & (stored != label_N)):
        raise DataError("the json fields do not line up with the loader's samples")
    hits = {name: torch.cat(c).numpy() for name, c in correct.items()}
    result = AffineResult(len(label_N), {n: float(h.mean()) for n, h in hits.items()})
    for parameter in AFFINE_PARAMETERS:
        values = np.abs([float(m[parameter]) for m in metadata[: len(label_N)]])
        top = max(abs(float(v)) for v in ranges.get(parameter, [values.max(initial=1.0)]))
        edges = np.linspace(0.0, top, AFFINE_BINS + 1)
        which = np.clip(np.digitize(values, edges[1:-1]), 0, AFFINE_BINS - 1)
        for b in range(AFFINE_BINS):
            inside = which == b
            acc = {
                n: float(h[inside].mean()) if inside.any() else float("nan")
                for n, h in hits.items()
            }
            result.bins.append(
                AffineBin(parameter, float(edges[b]), float(edges[b + 1]), int(inside.sum()), acc)
            )
    return result
