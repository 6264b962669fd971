"""Class sensitivity on two-object scenes (METHODS.md `class_sensitivity`).

Each of a sample's two objects is explained in turn (its label as the target); the map is
upsampled to the input, min-max scaled and Otsu-thresholded (`primitives.otsu_masks`, the
masks `segmentation` scores), and the metric is IoU(mask, explained object) − IoU(mask, other
object), per object. A method whose map ignores the class scores 0 exactly.
"""

from __future__ import annotations

import torch

from vitlens_server.evaluate.context import MetricContext, resized
from vitlens_server.evaluate.primitives import iou, otsu_masks, spearman
from vitlens_server.evaluate.registry import Scores, register_metric
from vitlens_server.explain.params import NoParams

__all__ = ["class_sensitivity"]


@register_metric(
    "class_sensitivity",
    needs_masks=True,
    needs_two_objects=True,
    description="IoU of the map's Otsu mask with the explained object minus that with the other.",
)
def class_sensitivity(ctx: MetricContext, _options: NoParams) -> Scores:
    """Per object (2B,), objects 0 of every sample first: ``difference`` (the metric),
    ``explained`` and ``other`` (its two IoUs); per sample (B,): ``between_classes``, the
    Spearman correlation of the sample's two input-resolution maps (1: the map ignores the
    class). The chunk's maps serve an object whose class they already explain, and both
    objects of a class-agnostic method (its map is the same for any class)."""
    maps = []  # (B, H, W) per object
    for k in (0, 1):
        classes = ctx.labels[:, k]
        if not ctx.method.spec.class_specific or torch.equal(ctx.explained, classes):
            maps.append(ctx.maps)
        else:
            maps.append(resized(ctx.explain(classes, ctx.masks[:, k]), ctx.size))
    explained, other = [], []
    for k, at_input in enumerate(maps):
        predicted = otsu_masks(at_input)  # (B, H, W) bool
        explained.append(iou(predicted, ctx.masks[:, k]))
        other.append(iou(predicted, ctx.masks[:, 1 - k]))
    explained_t, other_t = torch.cat(explained), torch.cat(other)
    return Scores(
        {
            "difference": explained_t - other_t,
            "explained": explained_t,
            "other": other_t,
            "between_classes": spearman(*maps),
        }
    )
