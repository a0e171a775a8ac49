"""Evaluation metrics (medpy-style definitions on MONAI surface distances)."""

from dust.metrics.segmentation import (
    EMPTY_BOTH_DISTANCE,
    EMPTY_BOTH_OVERLAP,
    EMPTY_MASK_POLICIES,
    EMPTY_ONE_OVERLAP,
    METRIC_NAMES,
    ClassMetrics,
    case_metrics,
    image_diagonal,
    summarize,
    write_case_csv,
)

__all__ = [
    "EMPTY_BOTH_DISTANCE",
    "EMPTY_BOTH_OVERLAP",
    "EMPTY_MASK_POLICIES",
    "EMPTY_ONE_OVERLAP",
    "METRIC_NAMES",
    "ClassMetrics",
    "case_metrics",
    "image_diagonal",
    "summarize",
    "write_case_csv",
]
