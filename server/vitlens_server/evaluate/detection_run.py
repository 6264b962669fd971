"""Evaluate on a detector: seed 003 Tab. 1's weakly supervised segmentation, and box AP.

    methods   the detection methods (`explain.detection.DETECTION_METHODS`) and ``random``
              (uniform noise per detection: the floor any method must clear)
    metrics   ``detection_segmentation``: every detection with class probability > 0.5
              explained, its map → upsample → min-max → Otsu → mask, COCO mask AP/AR from IoU
              0.2 against the ground-truth masks (`evaluate.detection_segmentation`);
              ``detection``: the detector's own box AP/AR (every query's most probable class,
              as DETR's COCO evaluation; IoU from 0.5, COCO's), reported once as method
              ``detector``
    dataset   images with per-object masks: held-out detection scenes
              (``synthetic_detection:N[:seed]``) or a COCO instances folder; each image is
              resized to the model's input as uploads are, and its masks with it (nearest), so
              masks are scored at the model's input size

AP is one number per dataset, not a mean over images, so its spread comes from a bootstrap over
images (``resamples`` draws, seeded): ``std`` is the bootstrap's standard deviation and the 95 %
interval its normal approximation; ``n`` counts the images. Model calls go through the worker
(`DetectionCalls`), in chunks, batched with live traffic.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from vitlens_server.data.detection import detection_scene, mask_boxes
from vitlens_server.data.scenes import SceneConfig, split_seeds
from vitlens_server.domain import MetricSummary, Progress, Summary
from vitlens_server.domain_detection import Detections
from vitlens_server.errors import InvalidArgument, clip
from vitlens_server.evaluate.detection_boxes import coco_boxes
from vitlens_server.evaluate.detection_segmentation import coco_mask_scores, detection_masks
from vitlens_server.evaluate.runner import Cancelled
from vitlens_server.evaluate.vqa_plan import count_and_seed
from vitlens_server.explain.detection import DETECTION_METHODS
from vitlens_server.imaging import resize_pixels

__all__ = [
    "DETECTION_METRICS",
    "SYNTHETIC_DETECTION",
    "DetectionCalls",
    "DetectionPlan",
    "DetectionSample",
    "SyntheticDetectionDataset",
    "parse_synthetic_detection",
    "plan_detection_evaluation",
    "run_detection_evaluation",
]

SYNTHETIC_DETECTION = "synthetic_detection"
RANDOM = "random"
DETECTOR = "detector"  # the method name the box metric is reported under
DETECTION_METRICS = ("detection_segmentation", "detection")
_FORM = f"dataset.synthetic must be {SYNTHETIC_DETECTION}:N[:seed] (held-out detection scenes)"
_OPTIONS = {"resamples": int, "iou_low": float}


@dataclass(frozen=True)
class DetectionSample:
    """One image: (H, W, 3) uint8, its objects' (K,) labels (the model's indices) and (K, H, W)
    bool masks."""

    id: str
    image: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


class SyntheticDetectionDataset:
    """Held-out detection scenes (`data.detection`) at ``size`` px, seeds of the test split."""

    def __init__(self, count: int, seed: int = 0, *, size: int = 224) -> None:
        self.seeds = split_seeds("test", count, base_seed=seed)
        self.config = SceneConfig(size=size)

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> DetectionSample:
        scene = detection_scene(self.seeds[index], config=self.config)
        labels = np.asarray(scene.labels, dtype=np.int64)
        return DetectionSample(f"scene_{scene.seed}", scene.image, labels, scene.masks)


def parse_synthetic_detection(text: str, size: int) -> SyntheticDetectionDataset:
    """``synthetic_detection:N[:seed]`` at ``size`` px; anything else is INVALID_ARGUMENT."""
    count, seed = count_and_seed(text, SYNTHETIC_DETECTION, _FORM)
    return SyntheticDetectionDataset(count, seed, size=size)


@dataclass(frozen=True)
class DetectionPlan:
    """Methods, metrics and their options, checked: ``resamples`` bootstrap draws (≥ 0) and
    ``iou_low`` the lowest IoU threshold of the segmentation metric (0.2: seed 003)."""

    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    resamples: int = 20
    iou_low: float = 0.2
    chunk_size: int = 16
    averaging: str = "gradient"  # generic's head averaging (method_options generic.averaging)


def plan_detection_evaluation(
    methods: Sequence[str],
    metrics: Sequence[str],
    metric_options: Mapping[str, Mapping[str, Any]],
    method_options: Mapping[str, Mapping[str, Any]],
    *,
    chunk_size: int = 16,
) -> DetectionPlan:
    """The checked plan; INVALID_ARGUMENT names the field at fault."""
    known = (*DETECTION_METHODS, RANDOM)
    if not methods:
        raise InvalidArgument(
            f"methods is empty; give some of: {', '.join(known)}", field="methods"
        )
    for i, name in enumerate(methods):
        if name not in known:
            raise InvalidArgument(
                f"methods[{i}] {clip(name)} does not apply to detectors; use: {', '.join(known)}",
                field=f"methods[{i}]",
            )
    if not metrics:
        metrics = ("detection_segmentation",)
    for i, name in enumerate(metrics):
        if name not in DETECTION_METRICS:
            raise InvalidArgument(
                f"metrics[{i}] {clip(name)} does not apply to detectors; use: "
                f"{', '.join(DETECTION_METRICS)}",
                field=f"metrics[{i}]",
            )
    averaging = "gradient"
    for name, options in method_options.items():
        where = f"method_options[{name}]"
        if name != "generic" or set(options) - {"averaging"}:
            raise InvalidArgument(
                f"{where}: detection methods take no options but generic's averaging",
                field=where,
            )
        averaging = options.get("averaging", averaging)
        if averaging not in ("gradient", "lrp"):
            raise InvalidArgument(
                f"{where}.averaging must be gradient or lrp", field=f"{where}.averaging"
            )
    found: dict[str, Any] = {}
    for metric, options in metric_options.items():
        if metric not in metrics:
            raise InvalidArgument(
                f"metric_options[{clip(metric)}] is for a metric not asked for",
                field=f"metric_options[{metric}]",
            )
        for key, value in options.items():
            where = f"metric_options[{metric}].{key}"
            kind = _OPTIONS.get(key)
            if kind is None or metric != "detection_segmentation":
                raise InvalidArgument(
                    f"{where}: unknown option; detection_segmentation takes resamples, iou_low",
                    field=where,
                )
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
                raise InvalidArgument(f"{where} must be a number", field=where)
            found[key] = kind(value)
    resamples, iou_low = found.get("resamples", 20), found.get("iou_low", 0.2)
    if not 0 <= resamples <= 1000:
        raise InvalidArgument("resamples must be in [0, 1000]", field="metric_options.resamples")
    if not 0.05 <= iou_low <= 0.95:
        raise InvalidArgument("iou_low must be in [0.05, 0.95]", field="metric_options.iou_low")
    return DetectionPlan(tuple(methods), tuple(metrics), resamples, iou_low, chunk_size, averaging)


class DetectionCalls(Protocol):
    """How a run reaches the model (its worker)."""

    def explain(self, pixels: Tensor, method: str, averaging: str = "gradient") -> list[Detections]:
        """Each image's detections with probability > 0.5 and their maps (n, gh, gw)."""
        ...

    def detect(self, pixels: Tensor) -> list[Detections]:
        """Each image's every query (no maps), for box AP."""
        ...


def run_detection_evaluation(
    plan: DetectionPlan,
    dataset: Sequence[DetectionSample],
    calls: DetectionCalls,
    *,
    input_size: tuple[int, int],
    grid: tuple[int, int],
    progress: Callable[[Progress], None] = lambda _: None,
    cancelled: threading.Event | None = None,
) -> list[MetricSummary]:
    """Run ``plan`` over ``dataset``: one summary per method x metric (the box metric once)."""
    cancelled = cancelled or threading.Event()
    segmenting = "detection_segmentation" in plan.metrics
    methods = plan.methods if segmenting else ()
    truth: list[tuple[np.ndarray, np.ndarray]] = []
    found: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {m: [] for m in methods}
    boxes: list[Detections] = []
    total = len(dataset) * (len(methods) + ("detection" in plan.metrics))
    done, started = 0, time.monotonic()
    for first in range(0, len(dataset), plan.chunk_size):
        _stop_if(cancelled)
        samples = [dataset[i] for i in range(first, min(first + plan.chunk_size, len(dataset)))]
        pixels = torch.stack([_pixels(s.image, input_size) for s in samples])  # (B, 3, H, W)
        truth += [(s.labels, _resized_masks(s.masks, input_size)) for s in samples]
        stages = [*methods, *((DETECTOR,) if "detection" in plan.metrics else ())]
        for method in stages:
            _stop_if(cancelled)
            if method == DETECTOR:
                boxes += calls.detect(pixels)
            else:
                detections = _explained(calls, pixels, method, grid, first, plan.averaging)
                found[method] += [_masked(d, input_size) for d in detections]
            done += len(samples)
            rate = done / max(time.monotonic() - started, 1e-9)
            progress(Progress(done, total, rate, (total - done) / rate, method))
    summaries = [
        MetricSummary(m, "detection_segmentation", _scored(plan, truth, found[m], input_size), {})
        for m in methods
    ]
    if "detection" in plan.metrics:
        box = _box_scores(truth, boxes, input_size)
        summaries.append(MetricSummary(DETECTOR, "detection", box, {}))
    return summaries


def _explained(
    calls: DetectionCalls,
    pixels: Tensor,
    method: str,
    grid: tuple[int, int],
    first: int,
    averaging: str,
) -> list[Detections]:
    if method != RANDOM:
        return calls.explain(pixels, method, averaging if method == "generic" else "gradient")
    generator = torch.Generator().manual_seed(first)  # the same noise for the same images
    found = calls.explain(pixels, "raw_attention")  # the detections; their maps replaced
    return [
        dataclasses.replace(d, heatmaps=torch.rand(len(d), *grid, generator=generator).numpy())
        for d in found
    ]


def _masked(found: Detections, size: tuple[int, int]):
    """(scores, labels, masks (n, H, W)) of one image's explained detections."""
    maps = torch.from_numpy(np.asarray(found.heatmaps, dtype=np.float32))
    masks = detection_masks(maps, size).numpy()
    return found.probabilities, found.labels, masks


def _scored(plan: DetectionPlan, truth, found, size: tuple[int, int]) -> dict[str, Summary]:
    """COCO mask metrics over every image, with bootstrap spreads."""

    def scores(rows: Sequence[int]) -> dict[str, float]:
        chosen = [truth[i] for i in rows], [found[i] for i in rows]
        return coco_mask_scores(*chosen, size, iou_low=plan.iou_low)

    return _bootstrapped(scores, len(truth), plan.resamples)


def _box_scores(truth, boxes: list[Detections], size: tuple[int, int]) -> dict[str, Summary]:
    """COCO box metrics of every query's detection (DETR's own evaluation), no bootstrap."""
    height, width = size
    scale = np.array([width, height, width, height], np.float32)
    truths = [(labels, mask_boxes(masks)) for labels, masks in truth]
    found = [(d.probabilities, d.labels, d.boxes * scale) for d in boxes]
    return _bootstrapped(lambda _rows: coco_boxes(truths, found, size), len(truth), 0)


def _bootstrapped(
    score: Callable[[Sequence[int]], dict[str, float]], count: int, resamples: int
) -> dict[str, Summary]:
    """The scores of all ``count`` images, each with the std of ``resamples`` bootstrap draws."""
    full = score(range(count))
    rng = np.random.default_rng(0)
    draws = [score(rng.integers(0, count, count).tolist()) for _ in range(resamples)]
    out = {}
    for key, value in full.items():
        values = np.array([d[key] for d in draws], dtype=np.float64)
        values = values[~np.isnan(values)]
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[key] = Summary(float(value), std, 1.96 * std, count)
    return out


def _pixels(image: np.ndarray, size: tuple[int, int]) -> Tensor:
    """(H, W, 3) uint8 → (3, *size) float in [0, 1], resized as uploads are."""
    return resize_pixels(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), size)


def _resized_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, H, W) bool → (K, *size) bool, nearest neighbour."""
    if masks.shape[1:] == tuple(size):
        return masks
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(masks).float()[None], size=size, mode="nearest"
    )
    return resized[0].bool().numpy()


def _stop_if(cancelled: threading.Event) -> None:
    if cancelled.is_set():
        raise Cancelled()
