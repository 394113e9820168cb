"""Pose equivariance (issue 12): how linearly a model's features follow a known transform.

Each test image x_b is transformed K ways with known parameters t_k (a shift, a rotation or
a scaling), and the change of its feature vector, f(T_k x_b) - f(x_b), is fitted by least
squares to an affine function of t_k. A representation that is *equivariant* to the
transform moves its features along a fixed linear map of the parameters (R² near 1); one that
is invariant, or that changes in a way unrelated to the parameters, leaves nothing for a
linear fit to explain (R² near the chance level, `EquivarianceResult.chance_r2`).

For CapsNet the feature vector is the pose of the winning class capsule (longest on the
*original* image, kept fixed for all its transformed copies), and the length of that capsule
is tracked too: ideally the pose moves while the length (the presence) stays put. For the
baseline CNN it is the penultimate activation vector (the input of the last Linear layer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.augment import shift_images

TRANSFORM_KINDS = ("shift", "rotation", "scale")
"""The known transforms, and the parameters each one reports (`known_transforms`):
shift -> (dx, dy) in pixels (right, down); rotation -> (degrees,) counterclockwise as
displayed; scale -> (factor,) about the image centre."""

PARAM_NAMES = {"shift": ("dx", "dy"), "rotation": ("degrees",), "scale": ("factor",)}

FeaturesFn = Callable[[torch.Tensor], tuple[Any, Any]]
"""images [N, C, H, W] -> (poses, lengths): either poses [N, D] and lengths [N] or None, or
capsule poses [N, J, D] with lengths [N, J] (the winner is then chosen per original image by
`pose_equivariance`). Tensors or arrays; they are converted to float64 numpy."""


# --------------------------------------------------------------------------- transforms


def _shift_grid(magnitudes: Sequence[Any]) -> np.ndarray:
    """[K, 2] integer (dx, dy): the grid magnitudes × magnitudes, or the given pairs."""
    first = np.asarray(magnitudes[0]) if len(magnitudes) else np.asarray(0)
    if first.ndim == 0:
        m = np.asarray(magnitudes, dtype=np.float64)
        dx, dy = np.meshgrid(m, m, indexing="ij")  # k = i * M + j: dx = m[i], dy = m[j]
        pairs = np.stack([dx.ravel(), dy.ravel()], axis=1)
    else:
        pairs = np.asarray(magnitudes, dtype=np.float64).reshape(-1, 2)
    if not np.all(pairs == np.round(pairs)):
        raise ValueError(f"shifts must be whole pixels, got {pairs.tolist()}")
    return pairs.astype(np.int64)


def _params(kind: str, magnitudes: Sequence[Any]) -> np.ndarray:
    """[K, P] float64 transform parameters for one image."""
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown transform kind {kind!r}; expected one of {TRANSFORM_KINDS}")
    if len(magnitudes) == 0:
        raise ValueError("no magnitudes given")
    if kind == "shift":
        return _shift_grid(magnitudes).astype(np.float64)
    p = np.asarray(magnitudes, dtype=np.float64).reshape(-1, 1)
    if kind == "scale" and np.any(p <= 0):
        raise ValueError(f"scale factors must be positive, got {p.ravel().tolist()}")
    return p


def _affine(images_BCHW: torch.Tensor, matrices_B22: torch.Tensor) -> torch.Tensor:
    """Output pixel q (pixel units, about the image centre) samples the input at M q;
    bilinear, zeros outside, so values stay within the input's range."""
    B, _, H, W = images_BCHW.shape
    work = (
        images_BCHW if images_BCHW.dtype in (torch.float32, torch.float64) else images_BCHW.float()
    )
    # Normalised coordinates (align_corners=False) are pixel coordinates divided by (W/2, H/2).
    s = torch.tensor([W / 2.0, H / 2.0], dtype=torch.float64)
    m = matrices_B22.to(torch.float64) * s[None, None, :] / s[None, :, None]  # S^-1 M S
    theta = torch.cat([m, torch.zeros(B, 2, 1, dtype=torch.float64)], dim=2)
    theta = theta.to(device=work.device, dtype=work.dtype)
    grid = F.affine_grid(theta, list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(images_BCHW.dtype)


def _transform_one_kind(images: torch.Tensor, kind: str, p_NP: np.ndarray) -> torch.Tensor:
    """Transform images[n] by the parameters p_NP[n] (one row per image)."""
    if kind == "shift":
        dx, dy = p_NP[:, 0].astype(np.int64), p_NP[:, 1].astype(np.int64)
        host = images.detach().cpu()
        as_np = host.numpy() if host.dtype != torch.bfloat16 else host.float().numpy()
        max_shift = int(max(np.abs(dx).max(initial=0), np.abs(dy).max(initial=0)))
        moved = shift_images(as_np, dy, dx, max_shift)
        return torch.from_numpy(moved).to(device=images.device, dtype=images.dtype)
    if kind == "rotation":
        a = torch.from_numpy(np.deg2rad(p_NP[:, 0]))
        c, s = torch.cos(a), torch.sin(a)
        # Counterclockwise as displayed (y down) moves p to [[c, s], [-s, c]] p; sample inverse.
        inverse = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
        return _affine(images, inverse)
    f = torch.from_numpy(1.0 / p_NP[:, 0])  # scale: content grows by `factor` about the centre
    zeros = torch.zeros_like(f)
    inverse = torch.stack([torch.stack([f, zeros], -1), torch.stack([zeros, f], -1)], -2)
    return _affine(images, inverse)


def _is_identity(kind: str, p_NP: np.ndarray) -> np.ndarray:
    if kind == "scale":
        return np.all(p_NP == 1.0, axis=1)
    if kind == "rotation":
        return np.all(np.mod(p_NP, 360.0) == 0.0, axis=1)
    return np.all(p_NP == 0.0, axis=1)


@torch.no_grad()
def known_transforms(
    images: torch.Tensor, kind: str, magnitudes: Sequence[Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image under every magnitude: (transformed [B*K, C, H, W], params [B*K, P]).

    Row b*K + k is image b under the k-th transform (image-major); params are float64.
    - "shift": magnitudes are whole pixels; a flat list m gives the K = M² grid of (dx, dy)
      with dx = m[k // M], dy = m[k % M], a list of pairs gives those (dx, dy). Positive dx
      moves the content right, positive dy down; zeros are shifted in
      (`pipeline.data.augment.shift_images`). P = 2 (dx, dy).
    - "rotation": angles in degrees, counterclockwise as displayed, about the image centre;
      bilinear, zeros outside. P = 1.
    - "scale": factors > 0 (2 doubles the size of the content) about the image centre;
      bilinear, zeros outside. P = 1.
    Deterministic; an identity transform (shift 0, angle 0, factor 1) returns its image
    exactly. Images are float in [0, 1] and stay so (bilinear weights are convex).
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float [B, C, H, W] tensor, got {images.shape}")
    p_KP = _params(kind, magnitudes)
    B, K = images.shape[0], p_KP.shape[0]
    p_NP = np.tile(p_KP, (B, 1))  # row b*K + k -> p_KP[k]
    expanded = images.repeat_interleave(K, dim=0)
    out = _transform_one_kind(expanded, kind, p_NP)
    identity = torch.from_numpy(_is_identity(kind, p_NP)).to(images.device)
    out = torch.where(identity[:, None, None, None], expanded, out)
    return out, torch.from_numpy(p_NP)


# --------------------------------------------------------------------------- measurement


@dataclass
class EquivarianceResult:
    """How linearly the features follow the transform parameters; see `pose_equivariance`."""

    kind: str
    """The transform ("shift", "rotation", "scale")."""
    param_names: tuple[str, ...]
    """The regressors, in order (("dx", "dy") for shifts)."""
    n_images: int
    """B, the number of test images."""
    n_transforms: int
    """K, the transformed copies per image."""
    feature_dim: int
    """D, the length of the feature vector."""
    r2: float
    """Pooled R² in [0, 1] of the affine fit of the feature change on the parameters."""
    chance_r2: float
    """P / (K - 1): the expected R² of features that change at random, independently of
    the parameters (isotropic noise); an R² at or below it shows no equivariance."""
    per_image_r2: list[float] = field(repr=False)
    """R² of each image alone (0 where its features do not change)."""
    pose_change: float = 0.0
    """RMS of the feature change over the RMS feature (originals and copies; 0: invariant)."""
    length_change: float | None = None
    """Capsules only: mean |length(T_k x_b) - length(x_b)| of the winning capsule, over
    the mean original winning length (0: perfectly stable presence)."""
    winner_kept: float | None = None
    """Capsules only: fraction of transformed copies whose longest capsule is still the
    original image's winner."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _features(
    fn: FeaturesFn, images: torch.Tensor, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    poses: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for start in range(0, images.shape[0], batch_size):
        p, ln = fn(images[start : start + batch_size])
        poses.append(_numpy(p))
        if ln is not None:
            lengths.append(_numpy(ln))
    if lengths and len(lengths) != len(poses):
        raise ValueError("features_fn returned lengths for some batches only")
    return np.concatenate(poses), (np.concatenate(lengths) if lengths else None)


def _select_winner(poses, lengths, winner_B, K):
    """Per-row pose [N, D] and length [N] of capsule winner_B[n // K] (or of the image)."""
    if poses.ndim == 2:
        return poses, (None if lengths is None else lengths.reshape(-1))
    rows, j = np.arange(poses.shape[0]), np.repeat(winner_B, K)
    return poses[rows, j], lengths[rows, j]


def _fit_r2(y_BKD: np.ndarray, p_KP: np.ndarray, scale: float):
    """Pooled and per-image R² of the least-squares affine fit y[b] ~ [1, p] @ beta[b]."""
    B, K, D = y_BKD.shape
    X = np.concatenate([np.ones((K, 1)), p_KP], axis=1)  # the same design for every image
    # One solve for all images: beta = pinv(X) @ y[b]; fitted = X @ pinv(X) @ y[b].
    hat = X @ np.linalg.pinv(X)  # [K, K] projection onto span{1, params}
    fitted = np.einsum("kl,bld->bkd", hat, y_BKD)
    centred = y_BKD - y_BKD.mean(axis=1, keepdims=True)
    ss_res_B = ((y_BKD - fitted) ** 2).sum(axis=(1, 2))
    ss_tot_B = (centred**2).sum(axis=(1, 2))
    # Float32 features jitter at ~1e-7 of their size: below that they did not change.
    floor = (1e-6 * scale) ** 2 * K * D
    moving = ss_tot_B > floor
    per_image = np.where(moving, 1.0 - ss_res_B / np.where(moving, ss_tot_B, 1.0), 0.0)
    ss_tot = ss_tot_B[moving].sum()
    pooled = 1.0 - ss_res_B[moving].sum() / ss_tot if ss_tot > 0 else 0.0
    return float(np.clip(pooled, 0.0, 1.0)), np.clip(per_image, 0.0, 1.0).tolist()


@torch.no_grad()
def pose_equivariance(
    features_fn: FeaturesFn,
    images: torch.Tensor,
    kind: str,
    magnitudes: Sequence[Any],
    *,
    batch_size: int = 256,
) -> EquivarianceResult:
    """Fit each image's feature change to its transform parameters; report the pooled R².

    For image b with original features f_b = f(x_b) [D] and its K transformed copies with
    parameters t_k [P] (`known_transforms`), the changes y_bk = f(T_k x_b) - f_b are fitted
    by ordinary least squares (float64) to y_bk ≈ a_b + B_b t_k, with a per-image intercept
    a_b [D] and slope matrix B_b [D, P]. With ŷ the fit and ȳ_b = mean_k y_bk,

        R² = 1 - Σ_b Σ_k ‖y_bk - ŷ_bk‖² / Σ_b Σ_k ‖y_bk - ȳ_b‖²,

    i.e. the fraction of the variance of the feature change (summed over the D dimensions,
    pooled over all images and transforms) that an affine function of the parameters
    explains. It lies in [0, 1], is unchanged by any rotation or uniform scaling of the
    feature space (orthogonal Q, scalar c: f -> c Q f), and is 1 exactly when every image's
    features move linearly with the parameters. Features that change independently of the
    parameters score about `chance_r2` = P / (K - 1). Images whose features do not change
    at all (total variance below float32 jitter: 1e-6 of the RMS feature over originals
    and copies) are left out of
    the pool (per-image R² 0); if none changes, R² is 0 (invariant, not equivariant).

    features_fn: see `FeaturesFn`. When it returns capsule poses [N, J, D] and lengths
    [N, J], the feature vector of every copy of image b is the pose of capsule
    j_b = argmax_j length(x_b)_j (the original's winner, kept fixed), and the length of that
    capsule gives `length_change` and `winner_kept`. The identity transform may be among the
    magnitudes (its change is 0 and it is fitted like any other). Needs K >= P + 2 so that
    the fit leaves residual degrees of freedom.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    p_KP = _params(kind, magnitudes)
    B, (K, P) = images.shape[0], p_KP.shape
    if K < P + 2:
        raise ValueError(f"{kind} needs at least {P + 2} magnitudes for a fit, got {K}")
    transformed, _ = known_transforms(images, kind, magnitudes)

    poses0, lengths0 = _features(features_fn, images, batch_size)
    poses1, lengths1 = _features(features_fn, transformed, batch_size)
    capsules = poses0.ndim == 3
    winner_B = None
    if capsules:
        if lengths0 is None or lengths1 is None or poses1.ndim != 3:
            raise ValueError("capsule poses [N, J, D] need lengths [N, J] to pick the winner")
        winner_B = lengths0.argmax(axis=1)
    f0_BD, len0_B = _select_winner(poses0, lengths0, winner_B, 1)
    f1_ND, len1_N = _select_winner(poses1, lengths1, winner_B, K)
    D = f0_BD.shape[1]

    y_BKD = f1_ND.reshape(B, K, D) - f0_BD[:, None, :]
    scale = float(np.sqrt((np.concatenate([f0_BD, f1_ND]) ** 2).mean())) if f0_BD.size else 0.0
    r2, per_image = _fit_r2(y_BKD, p_KP, max(scale, 1e-30))
    rms_change = float(np.sqrt((y_BKD**2).mean()))

    length_change = winner_kept = None
    if len0_B is not None and len1_N is not None:
        d = np.abs(len1_N.reshape(B, K) - len0_B[:, None])
        mean_len = float(len0_B.mean())
        length_change = float(d.mean() / mean_len) if mean_len > 0 else float("nan")
    if capsules and lengths1 is not None and winner_B is not None:
        kept = lengths1.argmax(axis=1).reshape(B, K) == winner_B[:, None]
        winner_kept = float(kept.mean())

    return EquivarianceResult(
        kind=kind,
        param_names=PARAM_NAMES[kind],
        n_images=B,
        n_transforms=K,
        feature_dim=D,
        r2=r2,
        chance_r2=P / (K - 1),
        per_image_r2=per_image,
        pose_change=rms_change / scale if scale > 0 else float("nan"),
        length_change=length_change,
        winner_kept=winner_kept,
    )


# --------------------------------------------------------------------------- model features


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def capsnet_features(model: nn.Module) -> FeaturesFn:
    """images -> (class-capsule poses [N, J, D], lengths [N, J]), in eval mode, no grad.

    `pose_equivariance` picks each original image's winning capsule from these.
    """

    def fn(images: torch.Tensor):
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                out = model(images.to(_device(model)))
        finally:
            model.train(was_training)
        return out.poses.float(), out.lengths.float()

    return fn


def cnn_features(model: nn.Module) -> FeaturesFn:
    """images -> (penultimate activations [N, F], None): the input of the last nn.Linear
    in `model.classifier` (after the ReLU and, in eval mode, the identity dropout)."""
    classifier = model.classifier
    if not isinstance(classifier, nn.Module):
        raise TypeError("cnn_features needs a model with an nn.Module `classifier`")
    linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model.classifier has no nn.Linear")
    last = linears[-1]

    def fn(images: torch.Tensor):
        captured: list[torch.Tensor] = []
        hook = last.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                model(images.to(_device(model)))
        finally:
            hook.remove()
            model.train(was_training)
        return captured[0].float(), None

    return fn
