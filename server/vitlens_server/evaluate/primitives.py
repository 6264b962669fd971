"""Batched building blocks of the metrics: upsampling, min-max, Otsu, IoU, Spearman, average
precision and the trapezoidal area under a curve.

All functions take a batch of maps and return one value per map, on the maps' device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "auc",
    "average_precision",
    "iou",
    "min_max",
    "otsu_masks",
    "otsu_thresholds",
    "spearman",
    "upsample_maps",
]

OTSU_BINS = 256


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h, w) maps → (B, H, W) by bilinear interpolation (no-op at the same size)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def min_max(maps: Tensor) -> Tensor:
    """Each map scaled to [0, 1]; a constant map becomes all zeros. (B, ...) → (B, ...)."""
    flat = maps.flatten(1)
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp(min=torch.finfo(flat.dtype).tiny), 0)
    return scaled.view_as(maps)


def otsu_thresholds(maps: Tensor, bins: int = OTSU_BINS) -> Tensor:
    """Otsu's threshold of each [0, 1] map, (B, ...) → (B,).

    The threshold maximises the between-class variance w0·w1·(μ0 − μ1)² over a ``bins``-bin
    histogram; it is the upper edge of the last background bin, so ``map > t`` is foreground.
    """
    flat = maps.flatten(1).clamp(0, 1)
    index = (flat * bins).long().clamp(max=bins - 1)  # (B, P)
    hist = torch.zeros(flat.shape[0], bins, device=maps.device, dtype=torch.float64)
    hist.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))
    prob = hist / hist.sum(dim=1, keepdim=True)
    centers = (torch.arange(bins, device=maps.device, dtype=torch.float64) + 0.5) / bins
    w0 = prob.cumsum(dim=1)  # background weight for threshold after bin k
    m0 = (prob * centers).cumsum(dim=1)
    total = m0[:, -1:]
    w1 = 1 - w0
    between = (total * w0 - m0) ** 2 / (w0 * w1).clamp(min=1e-12)
    between = torch.where((w0 > 0) & (w1 > 1e-12), between, -1.0)
    best = between.argmax(dim=1)
    return ((best + 1).to(maps.dtype)) / bins


def otsu_masks(maps: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """METHODS.md segmentation step: upsample → min-max → Otsu → bool masks (B, H, W)."""
    if size is not None:
        maps = upsample_maps(maps, size)
    scaled = min_max(maps.float())
    thresholds = otsu_thresholds(scaled)
    return scaled > thresholds.view(-1, *([1] * (scaled.dim() - 1)))


def iou(predicted: Tensor, truth: Tensor) -> Tensor:
    """Jaccard index of bool masks, (B, ...) x (B, ...) → (B,); 0 where both are empty."""
    predicted, truth = predicted.flatten(1).bool(), truth.flatten(1).bool()
    inter = (predicted & truth).sum(dim=1).double()
    union = (predicted | truth).sum(dim=1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), 0.0)


def average_precision(scores: Tensor, truth: Tensor) -> Tensor:
    """Average precision of each row's scores against its bool labels, (B, ...) x (B, ...) → (B,).

    The step-wise (non-interpolated) AP that sklearn's ``average_precision_score`` computes:
    AP = Σ_n (R_n − R_{n−1}) P_n over the distinct score values t_n taken as thresholds in
    descending order (predicted positive ⇔ score ≥ t_n). Ties therefore enter together: tied
    elements share one threshold, and the value does not depend on their order. Equivalently,
    AP = mean over the positives j of precision(score ≥ s_j), which is what is computed here.
    A row without positives has AP 0 (undefined; sklearn warns there, Chefer zeroes NaN).
    """
    values, truth = scores.flatten(1), truth.flatten(1).bool()
    count = values.shape[1]
    ascending, order = values.sort(dim=1)
    positive = truth.gather(1, order).to(torch.float64)  # (B, P) labels in ascending order
    first = torch.searchsorted(ascending.contiguous(), ascending.contiguous(), side="left")
    before = torch.cat([positive.new_zeros(len(values), 1), positive.cumsum(dim=1)], dim=1)
    total = before[:, -1:]  # (B, 1) number of positives
    hits = total - before.gather(1, first)  # positives with score ≥ s_j
    ranked = (count - first).to(torch.float64)  # elements with score ≥ s_j
    ap = (positive * hits / ranked).sum(dim=1) / total.squeeze(1).clamp(min=1)
    return torch.where(total.squeeze(1) > 0, ap, 0.0)


def auc(x: Tensor, y: Tensor) -> Tensor:
    """Trapezoidal area under the curves y (..., S) sampled at x (S,) → (...) in float64.

    Σ_i (x_{i+1} − x_i)·(y_i + y_{i+1})/2, linear in y: the mean of per-image areas equals the
    area under the mean curve, so per-image values can be averaged by the caller.
    """
    return torch.trapezoid(y.to(torch.float64), x.to(device=y.device, dtype=torch.float64), dim=-1)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of paired maps, (B, ...) x (B, ...) → (B,).

    Ties get their average rank (maps clamped at zero have many), so the value equals the Pearson
    correlation of the tie-averaged ranks; 0 where either map is constant.
    """
    ra, rb = _ranks(a.flatten(1).double()), _ranks(b.flatten(1).double())
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    return torch.where(denom > 0, (ra * rb).sum(dim=1) / denom.clamp(min=1e-300), 0.0)


def _ranks(values: Tensor) -> Tensor:
    """Tie-averaged ranks (0-based) along dim 1 of (B, P)."""
    batch, count = values.shape
    order = values.argsort(dim=1)
    ordered = values.gather(1, order)
    new_group = torch.ones_like(ordered, dtype=torch.bool)
    new_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = new_group.long().cumsum(dim=1) - 1  # (B, P) group id of each sorted position
    group = group + torch.arange(batch, device=values.device)[:, None] * count  # unique per row
    positions = torch.arange(count, device=values.device, dtype=values.dtype).expand(batch, -1)
    sums = torch.zeros(batch * count, device=values.device, dtype=values.dtype)
    sizes = torch.zeros_like(sums)
    sums.scatter_add_(0, group.flatten(), positions.flatten())
    sizes.scatter_add_(0, group.flatten(), torch.ones_like(positions).flatten())
    mean_rank = (sums / sizes.clamp(min=1))[group]  # (B, P) in sorted order
    return torch.empty_like(values).scatter_(1, order, mean_rank)
