"""An Evaluate run: explain a dataset with several methods and score the maps with metrics.

The run is CPU-side orchestration on its own thread; every model call (explanations, and the
re-classification of perturbed images, chunk by chunk) goes through ``calls`` — in the server,
the model's batcher, so an evaluation's passes batch with each other and with live traffic.
Samples are processed in chunks; after each (chunk, method) a `Progress` is reported, and the
run stops between steps once ``cancelled`` is set.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vitlens_server.domain import MetricSummary, Progress, Summary
from vitlens_server.errors import InvalidArgument
from vitlens_server.evaluate.datasets import Sample
from vitlens_server.evaluate.metrics import iou, otsu_masks, spearman
from vitlens_server.evaluate.options import metric_options
from vitlens_server.evaluate.perturbation import (
    CHEFER_STEPS,
    average_drop_increase,
    deletion_curve,
    insertion_curve,
    perturbation_auc,
    perturbation_curve,
)
from vitlens_server.evaluate.segmentation import segmentation_scores
from vitlens_server.explain import ExplainJob, ExplainResult, TargetSpec, get_method
from vitlens_server.explain.engine import resize_maps
from vitlens_server.explain.methods.reference import oracle_map
from vitlens_server.explain.params import parse_params
from vitlens_server.imaging import resize_pixels

__all__ = ["METRICS", "Cancelled", "EvaluationPlan", "MetricSummary", "Progress", "run_evaluation"]

METRICS = (
    "segmentation",
    "perturbation",
    "deletion",
    "insertion",
    "average_drop",
    "class_sensitivity",
    "sanity",
)
NEEDS_MASKS = {"segmentation", "class_sensitivity"}


class Cancelled(Exception):
    """The caller went away; the run stopped."""


class ModelCalls(Protocol):
    """Synchronous, thread-safe access to the model (through its batcher in the server)."""

    def explain(self, job: ExplainJob) -> ExplainResult: ...

    def logits(self, pixels: Tensor) -> Tensor: ...

    def randomised_explain(self, job: ExplainJob) -> ExplainResult:
        """``job`` explained by the model's weight-randomised copy (the ``sanity`` metric)."""
        ...


@dataclass(frozen=True)
class EvaluationPlan:
    """What to run. ``explain_label``: explain the dataset's label instead of the prediction."""

    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    method_options: dict[str, dict] = field(default_factory=dict)
    metric_options: dict[str, dict] = field(default_factory=dict)
    explain_label: bool = False
    chunk_size: int = 32


def run_evaluation(
    plan: EvaluationPlan,
    dataset: Sequence[Sample],
    calls: ModelCalls,
    *,
    input_size: tuple[int, int],
    grid: tuple[int, int],
    num_classes: int,
    progress: Callable[[Progress], None] = lambda _: None,
    cancelled: threading.Event | None = None,
) -> list[MetricSummary]:
    """Run ``plan`` over ``dataset``; returns one summary per method x metric."""
    _check(plan, dataset, num_classes)
    options = metric_options(plan.metrics, plan.metric_options)
    cancelled = cancelled or threading.Event()
    values: dict[tuple[str, str, str], list[np.ndarray]] = defaultdict(list)
    curves: dict[tuple[str, str, str], list[np.ndarray]] = defaultdict(list)
    xs: dict[tuple[str, str, str], list[float]] = {}
    total, done, started = len(dataset) * len(plan.methods), 0, time.monotonic()
    for first in range(0, len(dataset), plan.chunk_size):
        samples = [dataset[i] for i in range(first, min(first + plan.chunk_size, len(dataset)))]
        _check_labels(samples, num_classes)
        pixels, labels, masks = _batch(samples, input_size)
        for method in plan.methods:
            if cancelled.is_set():
                raise Cancelled("the evaluation was cancelled")
            scored = _score(plan, options, method, pixels, labels, masks, calls, input_size, grid)
            for (metric, name), (kind, x, y) in scored.items():
                key = (method, metric, name)
                if kind == "value":
                    values[key].append(y)
                else:
                    xs[key] = x
                    curves[key].append(y)
            done += len(samples)
            rate = done / max(time.monotonic() - started, 1e-9)
            progress(Progress(done, total, rate, (total - done) / rate, f"{method}"))
    return _summaries(plan, values, curves, xs)


def _check(plan: EvaluationPlan, dataset: Sequence[Sample], num_classes: int) -> None:
    unknown = [m for m in plan.metrics if m not in METRICS]
    if unknown:
        raise InvalidArgument(f"unknown metrics {unknown}; valid metrics: {', '.join(METRICS)}")
    if not plan.methods or not plan.metrics:
        raise InvalidArgument("name at least one method and one metric")
    for method in plan.methods:
        get_method(method)  # unknown names raise INVALID_ARGUMENT listing the valid ones
    if len(dataset) == 0:
        raise InvalidArgument("the dataset is empty")
    sample = dataset[0]
    if NEEDS_MASKS & set(plan.metrics) and sample.masks is None:
        raise InvalidArgument(
            f"metrics {sorted(NEEDS_MASKS & set(plan.metrics))} need ground-truth masks, which "
            "this dataset does not have"
        )
    if max(sample.labels) >= num_classes:
        raise InvalidArgument(
            f"sample {sample.id!r} is labelled {max(sample.labels)}, beyond the model's "
            f"{num_classes} classes: the dataset's labels must be the model's"
        )
    if "class_sensitivity" in plan.metrics and len(sample.labels) < 2:
        raise InvalidArgument(
            "class_sensitivity needs two-object samples (synthetic:N::two_object)"
        )


def _check_labels(samples: list[Sample], num_classes: int) -> None:
    for sample in samples:
        if max(sample.labels) >= num_classes or min(sample.labels) < 0:
            raise InvalidArgument(
                f"sample {sample.id!r} has labels {sample.labels}; the model has classes "
                f"0..{num_classes - 1}"
            )


def _batch(samples: list[Sample], size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor | None]:
    """Pixels (B, 3, H, W) in [0, 1] resized as the service resizes uploads, labels (B, K),
    masks (B, K, H, W) bool (nearest-neighbour resized)."""
    pixels = torch.stack(
        [resize_pixels(torch.from_numpy(s.image).permute(2, 0, 1), size) for s in samples]
    )
    width = min(len(s.labels) for s in samples)
    labels = torch.tensor([s.labels[:width] for s in samples])
    masks = None
    if all(s.masks is not None for s in samples):
        stacked = [torch.from_numpy(s.masks[:width]).float()[None] for s in samples]
        masks = torch.cat([F.interpolate(m, size=size, mode="nearest") for m in stacked]) > 0.5
    return pixels, labels, masks


def _maps(plan, method, pixels, classes, mask, calls, *, label: bool) -> tuple[Tensor, Tensor]:
    """Maps (B, h, w) of ``method`` at its own resolution (token grid or input pixels) and the
    classes they explain (B,); `resize_maps` turns them into what the service would return for
    either grid. ``label``: explain ``classes`` (else the prediction); ``mask`` (B, H, W) is the
    oracle's map."""
    if method == "oracle":
        return oracle_map(mask), classes
    spec = get_method(method)
    params = parse_params(spec.params, plan.method_options.get(method, {}), method=method)
    target = TargetSpec("per_image", tuple(classes.tolist())) if label else TargetSpec()
    result = calls.explain(ExplainJob(pixels, spec, params, target, grid="native"))
    return torch.from_numpy(result.heatmaps[:, 0]).float(), torch.from_numpy(result.targets[:, 0])


def _resized(maps: Tensor, size: tuple[int, int]) -> Tensor:
    return resize_maps(maps[:, None], size)[:, 0]


def _score(plan, options, method, pixels, labels, masks, calls, size, grid) -> dict[tuple, tuple]:
    """Per-image values and curves of every metric for one chunk and method; ``options``:
    metric name → its parsed options (`metric_options`)."""
    main_mask = None if masks is None else masks[:, 0]
    native, explained = _maps(
        plan, method, pixels, labels[:, 0], main_mask, calls, label=plan.explain_label
    )
    maps = _resized(native, size)
    out: dict[tuple[str, str], tuple[str, Any, np.ndarray]] = {}

    def value(metric: str, name: str, tensor: Tensor) -> None:
        out[(metric, name)] = ("value", None, tensor.double().cpu().numpy())

    def curve(metric: str, name: str, x: Sequence[float], y: Tensor) -> None:
        out[(metric, name)] = ("curve", list(map(float, x)), y.double().cpu().numpy())

    if "segmentation" in plan.metrics:
        threshold = options["segmentation"].threshold
        scores = segmentation_scores(maps, masks[:, 0], threshold=threshold)
        for name, tensor in scores.items():
            value("segmentation", name, tensor)
    if "perturbation" in plan.metrics:
        opts = options["perturbation"]
        for sign, positive in (("positive", True), ("negative", False)):
            hits = perturbation_curve(
                pixels, maps, labels[:, 0], calls.logits, positive=positive,
                baseline=opts.baseline, batch_size=opts.batch_size,
            )  # fmt: skip
            value("perturbation", f"{sign}_auc", perturbation_auc(hits))
            curve("perturbation", sign, (0.0, *CHEFER_STEPS), hits.double())
    for metric, fn in (("deletion", deletion_curve), ("insertion", insertion_curve)):
        if metric in plan.metrics:
            opts = options[metric]
            result = fn(
                pixels, maps, explained, calls.logits,
                steps=opts.steps, baseline=opts.baseline, batch_size=opts.batch_size,
            )  # fmt: skip
            value(metric, "auc", result.auc)
            curve(metric, "probability", result.fractions.tolist(), result.probabilities)
    if "average_drop" in plan.metrics:
        opts = options["average_drop"]
        terms = average_drop_increase(
            pixels, maps, explained, calls.logits, keep=opts.keep, batch_size=opts.batch_size
        )
        for name, tensor in terms.items():
            value("average_drop", name, tensor)
    if "class_sensitivity" in plan.metrics:
        difference = _class_sensitivity(plan, method, pixels, labels, masks, calls, size)
        value("class_sensitivity", "difference", difference)
    if "sanity" in plan.metrics:
        tokens = _resized(native, grid)
        value("sanity", "spearman", _sanity(plan, method, pixels, explained, tokens, calls))
    return out


def _class_sensitivity(plan, method, pixels, labels, masks, calls, size) -> Tensor:
    """Per object of two-object samples (2B,): IoU of the Otsu mask of the map explaining its
    class with its mask, minus the IoU with the other object's mask."""
    values = []
    for k in (0, 1):
        maps, _ = _maps(plan, method, pixels, labels[:, k], masks[:, k], calls, label=True)
        predicted = otsu_masks(_resized(maps, size), size)
        values.append(iou(predicted, masks[:, k]) - iou(predicted, masks[:, 1 - k]))
    return torch.cat(values)


def _sanity(plan, method, pixels, classes, maps, calls) -> Tensor:
    """(B,) Spearman correlation of the model's token-grid ``maps`` (B, gh, gw) with those of its
    weight-randomised copy for the same ``classes`` (Adebayo et al. 2018): low for a method that
    reads what the model learned. The oracle reads only the mask: its maps are the same map."""
    if method == "oracle":
        return spearman(maps, maps)
    spec = get_method(method)
    params = parse_params(spec.params, plan.method_options.get(method, {}), method=method)
    target = TargetSpec("per_image", tuple(classes.tolist()))
    randomised = calls.randomised_explain(ExplainJob(pixels, spec, params, target, grid="tokens"))
    return spearman(maps, torch.from_numpy(randomised.heatmaps[:, 0]).float())


def _summaries(plan, values, curves, xs) -> list[MetricSummary]:
    results = []
    for method in plan.methods:
        for metric in plan.metrics:
            stats = {
                name: Summary.of(np.concatenate(parts))
                for (m, k, name), parts in values.items()
                if m == method and k == metric
            }
            mean_curves = {
                name: (xs[(m, k, name)], np.concatenate(parts).mean(axis=0).tolist())
                for (m, k, name), parts in curves.items()
                if m == method and k == metric
            }
            results.append(MetricSummary(method, metric, stats, mean_curves))
    return results
