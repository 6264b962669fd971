"""An Evaluate run: explain a dataset with every planned method and score the maps with every
planned metric.

The run is CPU-side orchestration on its own thread; every model call (explanations, and the
re-classification of perturbed images, chunk by chunk) goes through ``calls`` (`ModelCalls`).
Samples are processed in chunks of ``plan.chunk_size``; each method explains a chunk once, at
its own resolution (`context.method_maps`), and every metric reads those maps from one
`MetricContext`. After each (chunk, method) a `Progress` is reported; the run stops between
steps once ``cancelled`` is set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vitlens_server.domain import MetricSummary, Progress, Summary
from vitlens_server.errors import InvalidArgument
from vitlens_server.evaluate.context import MetricContext, ModelCalls, method_maps, resized
from vitlens_server.evaluate.datasets import Sample
from vitlens_server.evaluate.plan import EvaluationPlan, PlannedMethod
from vitlens_server.evaluate.registry import Scores
from vitlens_server.imaging import resize_pixels

__all__ = ["Cancelled", "batch_samples", "run_evaluation"]


class Cancelled(Exception):
    """The caller went away; the run stopped."""


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
    """Run ``plan`` over ``dataset``; returns one summary per method x metric, in plan order.

    ``input_size`` (H, W) and ``grid`` (gh, gw): the model's input size and token grid.
    Raises `InvalidArgument` for a sample the plan cannot score (`EvaluationPlan.check_sample`;
    the first sample is checked before any model call) and `Cancelled` once ``cancelled`` is set.
    """
    if len(dataset) == 0:
        raise InvalidArgument("the dataset is empty")
    plan.check_sample(dataset[0], num_classes)
    cancelled = cancelled or threading.Event()
    collected = {(m.name, k.name): _Collected() for m in plan.methods for k in plan.metrics}
    total, done, started = len(dataset) * len(plan.methods), 0, time.monotonic()
    for first in range(0, len(dataset), plan.chunk_size):
        samples = [dataset[i] for i in range(first, min(first + plan.chunk_size, len(dataset)))]
        for sample in samples:
            plan.check_sample(sample, num_classes)
        pixels, labels, masks = batch_samples(samples, input_size)
        for method in plan.methods:
            _stop_if(cancelled)
            ctx = _context(plan, method, pixels, labels, masks, calls, grid)
            for metric in plan.metrics:
                _stop_if(cancelled)
                collected[(method.name, metric.name)].add(metric.spec.fn(ctx, metric.options))
            done += len(samples)
            rate = done / max(time.monotonic() - started, 1e-9)
            progress(Progress(done, total, rate, (total - done) / rate, method.name))
    return [collected[key].summary(*key) for key in collected]  # plan order


def batch_samples(
    samples: Sequence[Sample], size: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Pixels (B, 3, H, W) float32 in [0, 1] at ``size``, resized as the service resizes
    uploads (`imaging.resize_pixels`; images uint8 or float in [0, 1]); labels (B, K) long, K the
    fewest labels of any sample; masks (B, K, H, W) bool (nearest-neighbour resized), or None
    unless every sample has masks."""
    pixels = torch.stack([resize_pixels(_chw(s.image), size).float() for s in samples])
    width = min(len(s.labels) for s in samples)
    labels = torch.tensor([s.labels[:width] for s in samples])
    masks = None
    if all(s.masks is not None for s in samples):
        stacked = [torch.from_numpy(s.masks[:width]).float()[None] for s in samples]
        masks = torch.cat([F.interpolate(m, size=size, mode="nearest") for m in stacked]) > 0.5
    return pixels, labels, masks


def _chw(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 or float → (3, H, W) uint8 or float32."""
    if image.dtype != np.uint8:
        image = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(image).permute(2, 0, 1)


def _context(
    plan: EvaluationPlan,
    method: PlannedMethod,
    pixels: Tensor,
    labels: Tensor,
    masks: Tensor | None,
    calls: ModelCalls,
    grid: tuple[int, int],
) -> MetricContext:
    """Explain the chunk once: the prediction, or (``plan.explain_label``) the label."""
    main_mask = None if masks is None else masks[:, 0]
    native, explained = method_maps(
        method, pixels, calls, labels[:, 0], main_mask, label=plan.explain_label
    )
    maps = resized(native, tuple(pixels.shape[-2:]))
    return MetricContext(pixels, labels, masks, native, maps, explained, grid, method, calls)


def _stop_if(cancelled: threading.Event) -> None:
    if cancelled.is_set():
        raise Cancelled("the evaluation was cancelled")


@dataclass
class _Collected:
    """One method x metric's per-chunk values (n,) and curves (B, S), in host float64."""

    values: dict[str, list[np.ndarray]] = field(default_factory=dict)
    curves: dict[str, tuple[list[float], list[np.ndarray]]] = field(default_factory=dict)

    def add(self, scores: Scores) -> None:
        for name, tensor in scores.values.items():
            self.values.setdefault(name, []).append(_host(tensor))
        for name, curve in scores.curves.items():
            self.curves.setdefault(name, (list(map(float, curve.x)), []))[1].append(_host(curve.y))

    def summary(self, method: str, metric: str) -> MetricSummary:
        stats = {name: Summary.of(np.concatenate(parts)) for name, parts in self.values.items()}
        curves = {
            name: (x, np.concatenate(parts).mean(axis=0).tolist())
            for name, (x, parts) in self.curves.items()
        }
        return MetricSummary(method, metric, stats, curves)


def _host(tensor: Tensor) -> np.ndarray:
    return tensor.detach().double().cpu().numpy()
