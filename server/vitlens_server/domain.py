"""Domain types shared by every layer: what is explained, and the host-side results.

Plain dataclasses over numpy arrays: no torch, no protobuf, no grpc. `explain` and `evaluate`
produce them, `runtime` caches and schedules them, `rpc` encodes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "ExplainResult",
    "MetricSummary",
    "ParamInfo",
    "Predictions",
    "Progress",
    "Summary",
    "TargetSpec",
]


@dataclass(frozen=True)
class TargetSpec:
    """Which classes to explain: the prediction, one index, one per image, or the top k."""

    kind: Literal["predicted", "index", "per_image", "top_k"] = "predicted"
    indices: tuple[int, ...] = ()
    k: int = 1

    @property
    def count(self) -> int:
        """Explanations per image (K)."""
        return self.k if self.kind == "top_k" else 1

    def subset(self, images: Sequence[int]) -> TargetSpec:
        """The target of the images ``images`` of the request, as a request of their own."""
        if self.kind != "per_image":
            return self
        return TargetSpec("per_image", tuple(self.indices[i] for i in images))

    def key(self, image: int) -> str:
        """What image ``image`` is explained for (equal keys: equal explanations)."""
        if self.kind == "per_image":
            return f"index:{self.indices[image]}"
        if self.kind == "index":
            return f"index:{self.indices[0]}"
        return "top_k:1" if self.kind == "predicted" else f"top_k:{self.k}"


@dataclass(frozen=True)
class Predictions:
    """Top-k classes per image: ``indices``, ``probabilities``, ``logits`` all (B, k)."""

    indices: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray

    @staticmethod
    def concat(parts: list[Predictions]) -> Predictions:
        """Join per-chunk predictions along the batch axis."""
        return Predictions(
            indices=np.concatenate([p.indices for p in parts]),
            probabilities=np.concatenate([p.probabilities for p in parts]),
            logits=np.concatenate([p.logits for p in parts]),
        )


@dataclass(frozen=True)
class ExplainResult:
    """Host arrays for a batch of B images with K explained classes each.

    Attributes:
        predictions: top-k predictions.
        targets: (B, K) explained class indices, with their (B, K) probabilities and logits.
        heatmaps: (B, K, h, w) raw maps at the token grid, the input resolution, or (grid
            "native") the method's own.
        relevance: (B, K, N, N) token relevance, when requested.
        compute_seconds: device time of the passes and the method.
    """

    predictions: Predictions
    targets: np.ndarray
    target_probabilities: np.ndarray
    target_logits: np.ndarray
    heatmaps: np.ndarray
    relevance: np.ndarray | None
    compute_seconds: float

    @staticmethod
    def concat(parts: list[ExplainResult]) -> ExplainResult:
        """Join per-chunk results along the batch axis."""
        if len(parts) == 1:
            return parts[0]
        return ExplainResult(
            predictions=Predictions.concat([p.predictions for p in parts]),
            targets=np.concatenate([p.targets for p in parts]),
            target_probabilities=np.concatenate([p.target_probabilities for p in parts]),
            target_logits=np.concatenate([p.target_logits for p in parts]),
            heatmaps=np.concatenate([p.heatmaps for p in parts]),
            relevance=None
            if parts[0].relevance is None
            else np.concatenate([p.relevance for p in parts]),
            compute_seconds=sum(p.compute_seconds for p in parts),
        )


@dataclass(frozen=True)
class Summary:
    """Mean, standard deviation, 95 % confidence half-width (normal approximation) and n."""

    mean: float
    std: float
    ci95: float
    n: int

    @staticmethod
    def of(values: np.ndarray) -> Summary:
        values = np.asarray(values, dtype=np.float64)
        n = len(values)
        std = float(values.std(ddof=1)) if n > 1 else 0.0
        return Summary(float(values.mean()), std, 1.96 * std / math.sqrt(max(n, 1)), n)


@dataclass(frozen=True)
class Progress:
    """How far an evaluation run is: samples x methods done of the total, rate and ETA."""

    done: int
    total: int
    images_per_second: float
    eta_seconds: float
    stage: str


@dataclass(frozen=True)
class MetricSummary:
    """One method x metric: per-value statistics and mean curves ``name → (x, y)``."""

    method: str
    metric: str
    values: dict[str, Summary]
    curves: dict[str, tuple[list[float], list[float]]]


@dataclass(frozen=True)
class ParamInfo:
    """One option of a method or metric, as GetModel describes it."""

    name: str
    type: str  # float, int, bool or str
    default_json: str
    description: str
    choices: tuple[str, ...]
