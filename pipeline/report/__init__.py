"""`capsnet report` (issue 12): what capsules learned, measured on a checkpoint and shards.

`measures` holds the pose-equivariance measure, `sections` what each part of the report
computes, `document` writes report.md, report.json and the PNGs (through `pipeline.figures`).
"""

from pipeline.report.document import SECTIONS, ReportModel, ReportSettings, write_report
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
    "SECTIONS",
    "TRANSFORM_KINDS",
    "EquivarianceResult",
    "FeaturesFn",
    "ReportModel",
    "ReportSettings",
    "capsnet_features",
    "cnn_features",
    "known_transforms",
    "pose_equivariance",
    "write_report",
]
