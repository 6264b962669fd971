"""Quality metrics of explanations (METHODS.md "Metrics"). Never imports grpc."""

from vitlens_server.evaluate.metrics import (
    iou,
    min_max,
    otsu_masks,
    otsu_thresholds,
    spearman,
    upsample_maps,
)
from vitlens_server.evaluate.protocols import (
    Summary,
    class_specificity,
    explain_maps,
    randomised_copy,
    sanity_correlations,
    scene_pixels,
)

__all__ = [
    "Summary",
    "class_specificity",
    "explain_maps",
    "iou",
    "min_max",
    "otsu_masks",
    "otsu_thresholds",
    "randomised_copy",
    "sanity_correlations",
    "scene_pixels",
    "spearman",
    "upsample_maps",
]
