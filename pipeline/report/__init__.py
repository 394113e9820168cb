"""Measurements behind `capsnet report` (issue 12): pose equivariance of CapsNet and CNN features."""

from pipeline.report.measures import (
    TRANSFORM_KINDS,
    EquivarianceResult,
    FeaturesFn,
    capsnet_features,
    cnn_features,
    known_transforms,
    pose_equivariance,
)

__all__ = [
    "TRANSFORM_KINDS",
    "EquivarianceResult",
    "FeaturesFn",
    "capsnet_features",
    "cnn_features",
    "known_transforms",
    "pose_equivariance",
]
