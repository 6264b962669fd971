"""Segmentation quality of explanation maps against ground-truth masks (METHODS.md `segmentation`).

Per image (Coporan, seed 002 §3.2; Chefer et al. CVPR'21 ImageNet-segmentation table):

    M  = minmax(upsample(map))            bilinear to the mask's H x W, then scaled to [0, 1]
    Ŷ  = M > t                            t = Otsu's threshold of M (seed 002) or mean(M) (Chefer)
    pixel accuracy = (TP + TN) / (H·W)
    IoU (Jaccard)  = TP / (TP + FP + FN)           (and the background IoU, TN / (TN + FP + FN))
    F1 (Dice)      = 2·TP / (2·TP + FP + FN)
    AP             = average precision of the continuous map (`primitives.average_precision`)

Choices the papers leave open, fixed here:
- `ap` is Chefer's "mAP" as their evaluation code defines it: per image, the two class channels
  (M scored against the mask, 1 − M against the background) are pooled into one list of 2·H·W
  (score, label) pairs and one AP is taken over it; the table's mAP is the mean over images of
  these per-image APs. `ap_foreground` is the plain AP of the map against the mask alone, which
  ignores the min-max step (AP depends only on the order of the scores).
- Ties in AP are handled as sklearn does: tied scores form one threshold and enter together.
- Chefer's ImageNet-segmentation code thresholds at the mean of M, not with Otsu, and pools the
  pixel accuracy and the (foreground, background)-mean IoU over the whole data set; every value
  here is per image (the caller averages, with `Summary`), and `threshold="mean"` gives
  Chefer's binarisation. METHODS.md asks for Otsu (seed 002), the default.
- IoU, F1 and AP are 0 when undefined (an empty mask and an empty prediction), as
  `primitives.iou` and Chefer's code (which zeroes NaN) do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vitlens_server.evaluate.context import MetricContext
from vitlens_server.evaluate.primitives import (
    average_precision,
    min_max,
    otsu_thresholds,
    upsample_maps,
)
from vitlens_server.evaluate.registry import Scores, register_metric
from vitlens_server.explain.params import choice

__all__ = [
    "SEGMENTATION_KEYS",
    "SegmentationOptions",
    "segmentation",
    "segmentation_scores",
    "threshold_maps",
]

Threshold = Literal["otsu", "mean"]

SEGMENTATION_KEYS = ("pixel_accuracy", "iou", "iou_background", "f1", "ap", "ap_foreground")


def threshold_maps(scaled: Tensor, threshold: Threshold = "otsu") -> Tensor:
    """Bool foreground masks (B, H, W) of min-max scaled maps: ``M > t`` per image."""
    if threshold == "otsu":
        cut = otsu_thresholds(scaled)
    elif threshold == "mean":
        cut = scaled.flatten(1).mean(dim=1)
    else:
        raise ValueError(f"unknown threshold {threshold!r}; expected 'otsu' or 'mean'")
    return scaled > cut.view(-1, *([1] * (scaled.dim() - 1)))


def segmentation_scores(
    maps: Tensor,
    masks: Tensor,
    *,
    threshold: Threshold = "otsu",
) -> dict[str, Tensor]:
    """Segmentation metrics of (B, h, w) maps against (B, H, W) bool masks.

    Returns float64 tensors (B,) on the maps' device under `SEGMENTATION_KEYS`: pixel_accuracy,
    iou, iou_background, f1 (all from the thresholded mask), ap (Chefer's two-channel AP) and
    ap_foreground (AP of the map against the mask). With the default Otsu threshold the binary
    masks equal `primitives.otsu_masks(maps, (H, W))`, the masks `class_sensitivity` scores.
    """
    truth = masks.to(maps.device).bool()
    upsampled = upsample_maps(maps, tuple(truth.shape[-2:]))  # (B, H, W)
    predicted = threshold_maps(min_max(upsampled.float()), threshold)

    flat_p, flat_t = predicted.flatten(1), truth.flatten(1)
    tp = (flat_p & flat_t).sum(dim=1).double()
    fp = (flat_p & ~flat_t).sum(dim=1).double()
    fn = (~flat_p & flat_t).sum(dim=1).double()
    tn = (~flat_p & ~flat_t).sum(dim=1).double()

    scaled = min_max(upsampled)  # in the map's own dtype, so AP sees no extra rounding ties
    pooled_scores = torch.cat([scaled.flatten(1), 1 - scaled.flatten(1)], dim=1)
    pooled_truth = torch.cat([flat_t, ~flat_t], dim=1)
    return {
        "pixel_accuracy": (tp + tn) / flat_t.shape[1],
        "iou": _ratio(tp, tp + fp + fn),
        "iou_background": _ratio(tn, tn + fp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "ap": average_precision(pooled_scores, pooled_truth),
        "ap_foreground": average_precision(upsampled, truth),
    }


@dataclass(frozen=True)
class SegmentationOptions:
    threshold: str = choice(
        "otsu", "otsu", "mean", doc="Foreground cut: Otsu's threshold (seed 002) or the map's mean."
    )


@register_metric(
    "segmentation",
    options=SegmentationOptions,
    needs_masks=True,
    description="Thresholded map versus the object's mask: pixel accuracy, IoU, F1, AP.",
)
def segmentation(ctx: MetricContext, options: SegmentationOptions) -> Scores:
    """`segmentation_scores` of the input-resolution maps against the scored object's masks."""
    return Scores(segmentation_scores(ctx.maps, ctx.masks[:, 0], threshold=options.threshold))


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, 0 where the denominator is 0."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), 0.0)
