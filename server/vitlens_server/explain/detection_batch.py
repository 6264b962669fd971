"""Batches of detection jobs: every image of every job in one forward pass, one backward pass.

A job is one request (or a chunk of one): its images, how its detections are chosen (a
probability threshold and a cap, or fixed queries) and the output options. Jobs of a batch with
equal `DetectionExplainJob.group` (method, averaging, grid) run as one `explain_detections`
call: the selection is per image, so jobs with different thresholds still share the passes.
Each image's detections come back as `Detections` with boxes, classes, heatmaps (on the
encoder's token grid, or upsampled to the input) and query relevance.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vitlens_server.domain import Predictions
from vitlens_server.domain_detection import DetectionResult, Detections
from vitlens_server.explain.detection import (
    DETECTION_METHODS,
    DetectionExplanation,
    explain_detections,
    select_detections,
)
from vitlens_server.explain.engine import resize_maps
from vitlens_server.explain.image_text_batch import by_group
from vitlens_server.models.detection_serving import LoadedDetector

__all__ = [
    "DEFAULT_THRESHOLD",
    "DetectionExplainJob",
    "DetectionPredictJob",
    "detections_of",
    "explain_detection_jobs",
    "predict_detection_jobs",
]

DEFAULT_THRESHOLD = 0.5  # seed 003's protocol


@dataclass(frozen=True)
class DetectionChoice:
    """Which queries of an image are its detections: above ``threshold`` (at most
    ``most``, 0: all), or exactly ``queries`` when given."""

    threshold: float = DEFAULT_THRESHOLD
    most: int = 0
    queries: tuple[int, ...] = ()

    def select(self, logits: Tensor) -> tuple[Tensor, ...]:
        """Per image, the chosen queries (n,) for (B, Q, C + 1) logits."""
        if self.queries:
            fixed = torch.tensor(self.queries, dtype=torch.long, device=logits.device)
            return tuple(fixed for _ in range(len(logits)))
        return select_detections(logits, self.threshold, self.most or None)


@dataclass(frozen=True)
class DetectionExplainJob:
    """Explain the detections of B images, ``pixels`` (B, 3, H, W) in [0, 1]."""

    pixels: Tensor
    method: str
    choice: DetectionChoice = DetectionChoice()
    averaging: str = "gradient"  # generic's head averaging: "gradient" or "lrp"
    grid: Literal["tokens", "input"] = "tokens"
    output_dtype: Literal["float32", "float16"] = "float32"

    @property
    def size(self) -> int:
        return len(self.pixels)

    @property
    def group(self) -> tuple:
        """Jobs with equal groups run as one explanation."""
        return (self.method, self.averaging, self.grid)


@dataclass(frozen=True)
class DetectionPredictJob:
    """Detect the objects of B images, ``pixels`` (B, 3, H, W) in [0, 1]."""

    pixels: Tensor
    choice: DetectionChoice = DetectionChoice()

    @property
    def size(self) -> int:
        return len(self.pixels)


def predict_detection_jobs(
    model: LoadedDetector, jobs: Sequence[DetectionPredictJob]
) -> list[Predictions]:
    """One forward pass for every job's images; per job, k = 0 predictions and its images'
    `Detections` (no heatmaps)."""
    with torch.inference_mode():
        logits, boxes = model.adapter.predict(model.normalise(torch.cat([j.pixels for j in jobs])))
    results, first = [], 0
    for job in jobs:
        rows = slice(first, first + job.size)
        chosen = job.choice.select(logits[rows])
        found = tuple(
            detections_of(logits[first + b], boxes[first + b], queries)
            for b, queries in enumerate(chosen)
        )
        empty = np.zeros((job.size, 0))
        results.append(Predictions(empty.astype(np.int64), empty, empty, detections=found))
        first += job.size
    return results


def explain_detection_jobs(
    model: LoadedDetector,
    jobs: Sequence[DetectionExplainJob],
    *,
    interrupted: Callable[[], bool] | None = None,
) -> list[DetectionResult]:
    """Every job's `DetectionResult`."""
    return by_group(jobs, lambda j: j.group, lambda g: _explain_group(model, g, interrupted))


def _explain_group(
    model: LoadedDetector,
    jobs: list[DetectionExplainJob],
    interrupted: Callable[[], bool] | None,
) -> list[DetectionResult]:
    started = time.perf_counter()
    offsets = np.cumsum([0] + [job.size for job in jobs])

    def select(logits: Tensor) -> list[Tensor]:
        return [
            q
            for job, start in zip(jobs, offsets, strict=False)
            for q in job.choice.select(logits[start : start + job.size])
        ]

    pixels = model.normalise(torch.cat([job.pixels for job in jobs]))
    out = explain_detections(
        model.adapter,
        pixels,
        DETECTION_METHODS[jobs[0].method],
        select=select,
        averaging=jobs[0].averaging,
        interrupted=interrupted,
    )
    seconds = time.perf_counter() - started
    return [
        DetectionResult(
            tuple(_explained(model, job, out, int(start) + b) for b in range(job.size)), seconds
        )
        for job, start in zip(jobs, offsets, strict=False)
    ]


def _explained(
    model: LoadedDetector, job: DetectionExplainJob, out: DetectionExplanation, item: int
) -> Detections:
    dtype = np.float16 if job.output_dtype == "float16" else np.float32
    found = detections_of(out.logits[item], out.boxes[item], out.queries[item])  # its classes
    heatmaps = out.heatmaps(item)[None].float()  # (1, n, gh, gw)
    if job.grid == "input":
        heatmaps = resize_maps(heatmaps, model.input_size[1:])
    return dataclasses.replace(
        found,
        heatmaps=heatmaps[0].cpu().numpy().astype(dtype),
        query_relevance=out.query_relevance[item].float().cpu().numpy().astype(dtype),
    )


def detections_of(logits: Tensor, boxes: Tensor, queries: Tensor) -> Detections:
    """One image's `Detections` (no heatmaps) at ``queries`` (n,), from its (Q, C + 1) logits
    and (Q, 4) (cx, cy, w, h) boxes: each query's most probable object class."""
    logits, boxes = logits.detach().float(), boxes.detach().float()
    queries = queries.to(logits.device)
    probs = logits.softmax(-1)[queries, :-1]  # (n, C)
    probabilities, labels = probs.max(-1) if len(queries) else (probs[:, 0], probs[:, 0].long())
    cx, cy, w, h = boxes[queries].unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp(0, 1)
    return Detections(
        queries=queries.cpu().numpy().astype(np.int64),
        labels=labels.cpu().numpy().astype(np.int64),
        probabilities=probabilities.cpu().numpy().astype(np.float32),
        logits=logits[queries, labels].cpu().numpy().astype(np.float32),
        boxes=corners.reshape(-1, 4).cpu().numpy().astype(np.float32),
    )
