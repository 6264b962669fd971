"""Quality metrics of explanations (METHODS.md "Metrics"). Never imports grpc."""

from vitlens_server.domain import Summary
from vitlens_server.evaluate.metrics import (
    auc,
    average_precision,
    iou,
    min_max,
    otsu_masks,
    otsu_thresholds,
    spearman,
    upsample_maps,
)
from vitlens_server.evaluate.perturbation import (
    CHEFER_STEPS,
    CausalCurve,
    average_drop_increase,
    blur,
    deletion_curve,
    inpaint,
    insertion_curve,
    perturbation_auc,
    perturbation_curve,
    removal_ranks,
)
from vitlens_server.evaluate.protocols import (
    class_specificity,
    explain_maps,
    randomised_copy,
    sanity_correlations,
    scene_pixels,
)
from vitlens_server.evaluate.segmentation import (
    SEGMENTATION_KEYS,
    segmentation_scores,
    threshold_maps,
)

__all__ = [
    "CHEFER_STEPS",
    "SEGMENTATION_KEYS",
    "CausalCurve",
    "Summary",
    "auc",
    "average_drop_increase",
    "average_precision",
    "blur",
    "class_specificity",
    "deletion_curve",
    "explain_maps",
    "inpaint",
    "insertion_curve",
    "iou",
    "min_max",
    "otsu_masks",
    "otsu_thresholds",
    "perturbation_auc",
    "perturbation_curve",
    "randomised_copy",
    "removal_ranks",
    "sanity_correlations",
    "scene_pixels",
    "segmentation_scores",
    "spearman",
    "threshold_maps",
    "upsample_maps",
]
