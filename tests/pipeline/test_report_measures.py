"""Pose-equivariance measures (issue 12): known transforms, the pooled R², model features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from capscore import BaselineCNN, BaselineCNNConfig, CapsNet, CapsNetConfig
from pipeline.report import (
    capsnet_features,
    cnn_features,
    known_transforms,
    pose_equivariance,
)

SHIFTS = [-2, -1, 0, 1, 2]  # a 5 x 5 grid of (dx, dy): K = 25, chance R² = 2 / 24


def bright_pixels(positions, size=12) -> torch.Tensor:
    """[B, 1, size, size] zeros with one 1 at each (y, x)."""
    images = torch.zeros(len(positions), 1, size, size)
    for b, (y, x) in enumerate(positions):
        images[b, 0, y, x] = 1.0
    return images


def centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """[N, 2] (x, y) intensity-weighted mean pixel coordinates."""
    H, W = images.shape[-2:]
    mass = images.sum(dim=(1, 2, 3)).clamp_min(1e-12)
    ys = torch.arange(H, dtype=images.dtype)[None, None, :, None]
    xs = torch.arange(W, dtype=images.dtype)[None, None, None, :]
    return torch.stack(
        [(images * xs).sum(dim=(1, 2, 3)) / mass, (images * ys).sum(dim=(1, 2, 3)) / mass], 1
    )


A = torch.tensor([[1.0, 0.5], [-2.0, 0.3], [0.0, 1.0], [0.7, -0.7], [3.0, 1.0]])  # [D=5, 2]
POSITIONS = [(4, 4), (5, 7), (7, 5), (6, 6)]  # 2 px shifts keep every pixel inside 12 x 12


def test_zero_magnitude_returns_the_input_unchanged():
    images = torch.rand(3, 2, 12, 12, generator=torch.Generator().manual_seed(0))
    for kind, identity in [("shift", [0]), ("rotation", [0.0]), ("scale", [1.0])]:
        out, params = known_transforms(images, kind, identity)
        assert torch.equal(out, images), kind
        assert params.shape == (3, 2 if kind == "shift" else 1)


def test_transform_layout_and_directions():
    images = bright_pixels([(3, 5), (8, 2)])
    out, params = known_transforms(images, "shift", SHIFTS)
    assert out.shape == (2 * 25, 1, 12, 12) and params.shape == (50, 2)
    assert params.dtype == torch.float64
    # Row b*K + k is image b under (dx, dy) = params[k]: the bright pixel moves right/down.
    com = centre_of_mass(out).double()
    expected = centre_of_mass(images).double().repeat_interleave(25, 0) + params
    assert torch.allclose(com, expected)
    # Rotation is counterclockwise as displayed: 90 degrees is torch.rot90 over (H, W).
    rand = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    rot, _ = known_transforms(rand, "rotation", [90.0])
    assert torch.allclose(rot, torch.rot90(rand, 1, dims=(-2, -1)), atol=1e-5)
    # Scale 2 about the centre doubles the distance of a pixel pair's centre of mass.
    blob = torch.zeros(1, 1, 12, 12)
    blob[0, 0, 4:6, 4:6] = 1.0  # centre (4.5, 4.5), 1 px from the image centre (5.5, 5.5)
    big, _ = known_transforms(blob, "scale", [2.0])
    assert torch.allclose(centre_of_mass(big)[0], torch.tensor([3.5, 3.5]), atol=1e-4)
    assert float(big.min()) >= 0.0 and float(big.max()) <= 1.0


def test_deterministic():
    images = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    for kind, mags in [("shift", [-1, 1]), ("rotation", [-15.0, 10.0]), ("scale", [0.8, 1.2])]:
        a, pa = known_transforms(images, kind, mags)
        b, pb = known_transforms(images, kind, mags)
        assert torch.equal(a, b) and torch.equal(pa, pb)


def test_bad_arguments():
    images = torch.zeros(1, 1, 12, 12)
    with pytest.raises(ValueError, match="whole pixels"):
        known_transforms(images, "shift", [0.5])
    with pytest.raises(ValueError, match="unknown"):
        known_transforms(images, "shear", [1.0])
    with pytest.raises(ValueError, match="positive"):
        known_transforms(images, "scale", [0.0])
    with pytest.raises(ValueError, match="at least"):
        pose_equivariance(lambda x: (centre_of_mass(x), None), images, "rotation", [0.0, 1.0])


def test_features_linear_in_the_shift_give_r2_one():
    images = bright_pixels(POSITIONS)
    res = pose_equivariance(lambda x: (centre_of_mass(x) @ A.T, None), images, "shift", SHIFTS)
    assert res.r2 > 0.99 and min(res.per_image_r2) > 0.99
    assert (res.n_images, res.n_transforms, res.feature_dim) == (4, 25, 5)
    assert res.param_names == ("dx", "dy") and math.isclose(res.chance_r2, 2 / 24)
    assert res.pose_change > 0 and res.length_change is None and res.winner_kept is None


def test_features_ignoring_the_shift_give_r2_zero():
    images = bright_pixels(POSITIONS)

    def total_intensity(x):  # exactly invariant: the pixel never leaves the frame
        return x.sum(dim=(1, 2, 3))[:, None].repeat(1, 3), None

    invariant = pose_equivariance(total_intensity, images, "shift", SHIFTS)
    assert invariant.r2 < 0.05 and invariant.pose_change == 0.0

    same_place = bright_pixels([(6, 6)] * 3) * torch.tensor([1.0, 0.5, 0.8])[:, None, None, None]

    def even_in_the_shift(x):  # changes a lot, but symmetrically: no linear part on the grid
        d2 = (centre_of_mass(x) - 6.0) ** 2
        return torch.cat([d2, x.amax(dim=(1, 2, 3))[:, None] * d2.sum(1, keepdim=True)], 1), None

    even = pose_equivariance(even_in_the_shift, same_place, "shift", SHIFTS)
    assert even.r2 < 0.05 and even.pose_change > 0


def test_r2_is_invariant_to_rotating_and_scaling_the_feature_space():
    images = bright_pixels(POSITIONS)
    rng = torch.Generator().manual_seed(3)
    noise_map = torch.randn(144, 5, generator=rng)

    def partly_linear(x):  # linear part + a pixel-dependent nonlinear part: 0 < R² < 1
        return centre_of_mass(x) @ A.T + 0.3 * x.flatten(1) @ noise_map, None

    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=rng))

    def rotated(x):
        f, _ = partly_linear(x)
        return 7.5 * f @ q.T, None

    base = pose_equivariance(partly_linear, images, "shift", SHIFTS)
    turned = pose_equivariance(rotated, images, "shift", SHIFTS)
    assert 0.05 < base.r2 < 0.99
    assert turned.r2 == pytest.approx(base.r2, abs=1e-6)
    assert np.allclose(turned.per_image_r2, base.per_image_r2, atol=1e-6)


def test_capsule_features_pick_the_original_winner():
    images = bright_pixels(POSITIONS[:2])
    J, D = 3, 4

    def capsules(x):  # capsule 1 always longest; its pose is linear in the shift
        n = len(x)
        poses = torch.zeros(n, J, D)
        poses[:, 1, :2] = centre_of_mass(x)
        poses[:, 0] = 1.0  # a constant decoy capsule
        lengths = torch.tensor([0.2, 0.9, 0.1]).repeat(n, 1)
        return poses, lengths

    res = pose_equivariance(capsules, images, "shift", SHIFTS)
    assert res.r2 > 0.99 and res.feature_dim == D
    assert res.length_change == 0.0 and res.winner_kept == 1.0


@pytest.mark.parametrize("kind, mags", [("shift", [-1, 0, 1]), ("rotation", [-10.0, 0.0, 10.0])])
def test_tiny_capsnet_gives_finite_measures(kind, mags):
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig.tiny())
    model.train()
    images = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    res = pose_equivariance(capsnet_features(model), images, kind, mags, batch_size=4)
    assert model.training  # the helper restores the mode
    assert res.feature_dim == CapsNetConfig.tiny().class_dim
    assert 0.0 <= res.r2 <= 1.0 and all(0.0 <= r <= 1.0 for r in res.per_image_r2)
    assert math.isfinite(res.pose_change) and res.pose_change >= 0
    assert res.length_change is not None and math.isfinite(res.length_change)
    assert res.length_change >= 0 and 0.0 <= res.winner_kept <= 1.0
    assert res.to_dict()["kind"] == kind


@pytest.mark.parametrize("kind, mags", [("shift", [-1, 0, 1]), ("scale", [0.9, 1.0, 1.1])])
def test_tiny_cnn_gives_finite_measures(kind, mags):
    torch.manual_seed(0)
    cfg = BaselineCNNConfig.tiny()
    model = BaselineCNN(cfg)
    images = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(5))
    feats, lengths = cnn_features(model)(images)
    assert feats.shape == (3, cfg.fc_hidden[-1]) and lengths is None
    res = pose_equivariance(cnn_features(model), images, kind, mags)
    assert 0.0 <= res.r2 <= 1.0 and math.isfinite(res.pose_change)
    assert res.length_change is None and res.winner_kept is None
