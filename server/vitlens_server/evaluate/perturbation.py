"""Perturbation metrics of explanation maps: re-classify images with pixels removed in the order
of the map's relevance (METHODS.md `perturbation`, `deletion` / `insertion`, `average_drop`).

All perturbed images of all steps and all images are built on the pixels' device and sent to
``logits_fn`` ((n, C, H, W) pixels in [0, 1] → (n, classes) logits, e.g. `ExtraPasses.logits`)
in chunks of ``batch_size`` images, one call per chunk: a chunk mixes steps and images.

Shared conventions (choices the papers leave open, fixed here):
- The map is upsampled bilinearly to H x W first (`primitives.upsample_maps`, as Chefer's code does
  with ``interpolate(scale_factor=16, mode="bilinear")``); relevance orders pixels, never tokens.
- Order: pixels are ranked by relevance, highest first ("most relevant first"), or lowest first
  for Chefer's negative perturbation. Ties are broken by the row-major pixel index, lower index
  first, in both directions (a stable sort), so a constant map removes pixels in reading order.
  Chefer uses ``torch.topk`` and RISE ``np.argsort``, whose tie orders are unspecified.
- "Zero" / "zeros" is pixel value 0 in [0, 1] space, on every channel, before the model's
  mean/std normalisation: a black pixel, as in Chefer's code (which zeroes ``data`` and then
  normalises). RISE's reference code zeroes the *normalised* tensor (the data set's mean colour);
  pass ``baseline=`` a (C,) mean colour to get that.
- Removal by a constant leaves the *shape* of what was removed in the image. Where the shape is
  the class (vitlens' generated scenes), a map that removes exactly the object scores worst: its
  black silhouette is still classified correctly. ``baseline="inpaint"`` fills removed pixels
  from the kept ones instead (`inpaint`; the idea of ROAD, Rong et al., ICML 2022, which
  imputes removed pixels from their neighbours to stop the mask's shape leaking the class).
- A fraction p of P = H·W pixels is ⌊p·P⌋ pixels (Chefer's ``int(base_size * p)``; a 1e-9 guard
  keeps products such as 0.29·100 from rounding down).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vitlens_server.evaluate.primitives import auc, upsample_maps

__all__ = [
    "CHEFER_STEPS",
    "CausalCurve",
    "average_drop_increase",
    "blur",
    "deletion_curve",
    "inpaint",
    "insertion_curve",
    "perturbation_auc",
    "perturbation_curve",
    "removal_ranks",
]

LogitsFn = Callable[[Tensor], Tensor]
Fill = Callable[[Tensor, Tensor], Tensor]  # (n, C, H, W) images, (n, 1, H, W) holes → images
Baseline = Literal["zeros", "blur", "inpaint"] | Tensor
BASELINES = ("zeros", "blur", "inpaint")

CHEFER_STEPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BLUR_KERNEL = 11  # RISE's reference code: gkern(klen=11, nsig=5)
BLUR_SIGMA = 5.0


class CausalCurve(NamedTuple):
    """Deletion or insertion result: ``probabilities`` (B, K+1) of the class at each step,
    ``fractions`` (K+1,) of pixels changed at each step (from 0 to 1), ``auc`` (B,) in [0, 1]."""

    probabilities: Tensor
    fractions: Tensor
    auc: Tensor


def removal_ranks(maps: Tensor, size: tuple[int, int], *, descending: bool = True) -> Tensor:
    """Position of every pixel in the removal order, (B, h, w) maps → (B, H·W) long.

    Rank 0 is removed first: the most relevant pixel (``descending``) or the least relevant;
    ties go to the lower row-major pixel index. "Remove the first k" is ``ranks < k``.
    """
    maps = maps if maps.is_floating_point() else maps.float()
    flat = upsample_maps(maps, size).flatten(1)
    order = flat.argsort(dim=1, descending=descending, stable=True)  # (B, P) pixel indices
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def perturbation_curve(
    pixels: Tensor,
    maps: Tensor,
    labels: Tensor,
    logits_fn: LogitsFn,
    *,
    positive: bool,
    steps: Sequence[float] = CHEFER_STEPS,
    baseline: Baseline = "zeros",
    batch_size: int = 64,
) -> Tensor:
    """Chefer et al.'s perturbation test (seed 003 Tab. 2; ICCV'21 / CVPR'21 code).

    For each p in ``steps`` the top-p fraction of pixels by relevance (``positive``) or the
    bottom-p (negative) is set to 0 (Chefer; or replaced by another ``baseline``) and the image
    re-classified; a hit is top-1 = label. pixels (B, C, H, W) in [0, 1], maps (B, h, w),
    labels (B,) → hits (B, S+1) bool, column 0 the unperturbed image. Chefer's labels are the
    ground-truth classes in both of Tab. 2's rows ("predicted" / "target" name the class the map
    explains); the caller passes the labels.
    """
    size = tuple(pixels.shape[-2:])
    ranks = removal_ranks(maps.to(pixels.device), size, descending=positive)
    counts = [0] + [_fraction_count(p, ranks.shape[1]) for p in steps]
    base = _baseline(pixels, baseline)
    return _replaced_scores(pixels, base, ranks, counts, labels, logits_fn, _hits, batch_size)


def perturbation_auc(hits: Tensor, steps: Sequence[float] = CHEFER_STEPS) -> Tensor:
    """Per-image area (B,) under hits (B, S+1) over x = [0, *steps], x100 (trapezoid).

    The area is linear in the curve, so the mean over images of these values equals Chefer's
    AUC of the mean accuracy curve (≤ 90 for the default steps)."""
    x = torch.tensor([0.0, *steps], dtype=torch.float64)
    return auc(x, hits.to(torch.float64)) * 100


def deletion_curve(
    pixels: Tensor,
    maps: Tensor,
    labels: Tensor,
    logits_fn: LogitsFn,
    *,
    steps: int = 16,
    baseline: Baseline = "zeros",
    batch_size: int = 64,
) -> CausalCurve:
    """Deletion (Petsiuk et al. 2018, RISE; seed 004 §4.3): the most relevant pixels are
    replaced by the baseline first; lower AUC is better.

    After step k of K = ``steps`` the first ⌊k·P/K⌋ pixels of the order are replaced (RISE
    replaces ``step`` pixels per step; K = P / step), so step K is the baseline itself. The curve
    is softmax(logits)[label] at each step; its AUC is the trapezoid over the fraction of pixels
    changed, in [0, 1] (RISE's ``auc`` when P is a multiple of K). RISE deletes towards zeros;
    with ``"inpaint"`` step K, nothing left to fill from, is black.
    """
    base = _baseline(pixels, baseline)
    return _causal(pixels, base, maps, labels, logits_fn, steps, batch_size)


def insertion_curve(
    pixels: Tensor,
    maps: Tensor,
    labels: Tensor,
    logits_fn: LogitsFn,
    *,
    steps: int = 16,
    baseline: Baseline = "blur",
    batch_size: int = 64,
) -> CausalCurve:
    """Insertion (RISE): the image's pixels are copied onto the baseline, most relevant first;
    higher AUC is better. Steps, curve and AUC as in `deletion_curve`; RISE inserts into a
    blurred copy of the image (`blur`). ``"inpaint"`` is refused: the canvas has no pixels of
    the image to fill from."""
    if isinstance(baseline, str) and baseline == "inpaint":
        raise ValueError("insertion starts from an empty canvas: use baseline 'blur' or 'zeros'")
    base = _baseline(pixels, baseline)
    return _causal(base, pixels, maps, labels, logits_fn, steps, batch_size)


def average_drop_increase(
    pixels: Tensor,
    maps: Tensor,
    labels: Tensor,
    logits_fn: LogitsFn,
    *,
    keep: float = 0.5,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Average Drop / Average Increase terms per image (seed 004 Eq. 5-6).

    Y = softmax probability of the label on the image, O = the same with only the top ``keep``
    fraction of pixels by relevance kept (⌊keep·P⌋, the others set to 0). Returns (B,) float64:
    ``average_drop`` = max(0, Y − O) / Y · 100 (0 where Y = 0) and ``average_increase`` =
    1[Y < O] · 100; the metrics are their means. Seed 004 writes Eq. 5-6 without the x100 of
    METHODS.md and Grad-CAM++'s tables, and keeps the top 50 % where Grad-CAM++ multiplies
    the image by the map; this follows seed 004.
    """
    ranks = removal_ranks(maps.to(pixels.device), tuple(pixels.shape[-2:]))
    counts = [ranks.shape[1], _fraction_count(keep, ranks.shape[1])]  # all pixels, top `keep`
    zeros = pixels.new_zeros(()).expand_as(pixels)
    probs = _replaced_scores(zeros, pixels, ranks, counts, labels, logits_fn, _probs, batch_size)
    y, o = probs[:, 0], probs[:, 1]
    drop = torch.where(y > 0, (y - o).clamp(min=0) / y.clamp(min=1e-300), 0.0) * 100
    return {"average_drop": drop, "average_increase": (y < o).to(torch.float64) * 100}


def blur(pixels: Tensor, kernel_size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> Tensor:
    """Gaussian blur of (B, C, H, W) pixels, per channel: the RISE insertion canvas.

    The kernel is the sampled Gaussian exp(−d²/2σ²) on a ``kernel_size`` grid, normalised to sum
    1, applied separably; borders use replicate padding (RISE's code zero-pads a normalised
    tensor, which pulls the border towards the mean colour; the paper says only "blurred").
    """
    offsets = torch.arange(kernel_size, device=pixels.device, dtype=pixels.dtype)
    weights = torch.exp(-((offsets - (kernel_size - 1) / 2) ** 2) / (2 * sigma**2))
    weights = weights / weights.sum()
    channels, pad = pixels.shape[1], kernel_size // 2
    rows = weights.view(1, 1, 1, -1).expand(channels, 1, 1, kernel_size)
    padded = F.pad(pixels, (pad, pad, pad, pad), mode="replicate")
    out = F.conv2d(padded, rows, groups=channels)
    return F.conv2d(out, rows.transpose(2, 3), groups=channels)


def inpaint(pixels: Tensor, holes: Tensor) -> Tensor:
    """Fill the ``holes`` (n, 1, H, W) bool of ``pixels`` (n, C, H, W) from the other pixels.

    Push-pull interpolation (Gortler et al., "The Lumigraph", 1996): an image pyramid of
    hole-aware averages (each level the mean of the known pixels below it) is built up to 1 x 1,
    then filled back down, each level keeping its known share and taking the rest from the
    bilinearly upsampled coarser level. Known pixels are returned unchanged; a hole takes the
    colours around it, smoothly (a hole in a uniform region becomes that colour exactly). An
    image with no known pixel becomes black. O(H·W) per image, batched, on the pixels' device.
    """
    known = (~holes).to(pixels.dtype)
    values, weights = [pixels * known], [known]  # premultiplied: value · weight
    while max(values[-1].shape[-2:]) > 1:
        values.append(F.avg_pool2d(values[-1], 2, ceil_mode=True))
        weights.append(F.avg_pool2d(weights[-1], 2, ceil_mode=True))
    filled = values[-1] / weights[-1].clamp(min=torch.finfo(pixels.dtype).tiny)
    for value, weight in zip(reversed(values[:-1]), reversed(weights[:-1]), strict=True):
        coarse = F.interpolate(filled, size=value.shape[-2:], mode="bilinear", align_corners=False)
        filled = value + (1 - weight) * coarse
    return torch.where(holes, filled, pixels)


def _causal(
    start: Tensor,
    finish: Tensor | Fill,
    maps: Tensor,
    labels: Tensor,
    logits_fn: LogitsFn,
    steps: int,
    batch_size: int,
) -> CausalCurve:
    """Probabilities of images that move from ``start`` to ``finish``, most relevant first."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    ranks = removal_ranks(maps.to(start.device), tuple(start.shape[-2:]))
    total = ranks.shape[1]
    counts = [k * total // steps for k in range(steps + 1)]
    probs = _replaced_scores(start, finish, ranks, counts, labels, logits_fn, _probs, batch_size)
    fractions = torch.tensor(counts, dtype=torch.float64, device=probs.device) / total
    return CausalCurve(probs, fractions, auc(fractions, probs))


def _replaced_scores(
    original: Tensor,
    replacement: Tensor | Fill,
    ranks: Tensor,
    counts: Sequence[int],
    labels: Tensor,
    logits_fn: LogitsFn,
    score: Callable[[Tensor, Tensor], Tensor],
    batch_size: int,
) -> Tensor:
    """score(logits, label) (B, S) of the images whose pixels ranked below ``counts[s]`` come
    from ``replacement`` and the rest from ``original`` (both (B, C, H, W), maybe expanded), or
    are filled by ``replacement(original, holes)`` when it is a `Fill`.

    The B·S images are indexed image-major (n = b·S + s) and built chunk by chunk."""
    batch, steps = ranks.shape[0], len(counts)
    height, width = original.shape[-2:]
    device = ranks.device
    limits = torch.as_tensor(counts, device=device)
    labels = labels.to(device)
    scores = []
    for start in range(0, batch * steps, batch_size):
        flat = torch.arange(start, min(start + batch_size, batch * steps), device=device)
        image, step = flat // steps, flat % steps
        take = (ranks[image] < limits[step, None]).view(-1, 1, height, width)  # (n, 1, H, W)
        if callable(replacement):
            chunk = replacement(original[image], take)  # (n, C, H, W)
        else:
            chunk = torch.where(take, replacement[image], original[image])
        scores.append(score(logits_fn(chunk), labels[image]))
    return torch.cat(scores).view(batch, steps)


def _hits(logits: Tensor, labels: Tensor) -> Tensor:
    return logits.argmax(dim=1) == labels.to(logits.device)


def _probs(logits: Tensor, labels: Tensor) -> Tensor:
    probs = logits.to(torch.float64).softmax(dim=1)
    return probs.gather(1, labels.to(logits.device)[:, None])[:, 0]


def _fraction_count(fraction: float, total: int) -> int:
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction {fraction} is not in [0, 1]")
    return math.floor(fraction * total + 1e-9)


def _baseline(pixels: Tensor, baseline: Baseline) -> Tensor | Fill:
    """(B, C, H, W) canvas: zeros, `blur`, or a tensor broadcast to the pixels ((C,) = colour);
    or the `inpaint` fill."""
    if isinstance(baseline, Tensor):
        value = baseline.to(pixels)
        value = value.view(-1, 1, 1) if value.dim() == 1 else value
        return value.expand_as(pixels)
    if baseline == "zeros":
        return pixels.new_zeros(()).expand_as(pixels)
    if baseline == "blur":
        return blur(pixels)
    if baseline == "inpaint":
        return inpaint
    raise ValueError(f"unknown baseline {baseline!r}; expected one of {BASELINES} or a tensor")
