"""Domain values of object detection (no torch, no protobuf): one image's detections, explained.

`Detections` are what Predict returns per image and what Explain fills with heatmaps;
`DetectionResult` is Explain's answer for a batch, split into B = 1 rows for the cache and the
reply like `vitlens_server.domain.ExplainResult`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DetectionQuery", "DetectionResult", "Detections"]


@dataclass(frozen=True)
class DetectionQuery:
    """A request's choice of detections (unchecked): a probability ``threshold`` (None: the
    default), at most ``max_detections`` per image (0: all), or exactly ``queries``."""

    threshold: float | None = None
    max_detections: int = 0
    queries: tuple[int, ...] = ()


@dataclass(frozen=True)
class Detections:
    """One image's n detections, most probable first.

    Attributes:
        queries: (n,) int64, the object query of each.
        labels: (n,) int64 class indices into the model's labels.
        probabilities: (n,) float32, softmax over the classes and "no object".
        logits: (n,) float32, the class logit (what Explain explains).
        boxes: (n, 4) float32 (x1, y1, x2, y2) as fractions of the width and height, in [0, 1].
        heatmaps: Explain: (n, h, w) each detection's relevance over the image; else None.
        query_relevance: Explain: (n, Q) each detection's relevance of the Q queries; else None.
    """

    queries: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray
    boxes: np.ndarray
    heatmaps: np.ndarray | None = None
    query_relevance: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def nbytes(self) -> int:
        arrays = [self.queries, self.labels, self.probabilities, self.logits, self.boxes]
        arrays += [a for a in (self.heatmaps, self.query_relevance) if a is not None]
        return sum(a.nbytes for a in arrays)


@dataclass(frozen=True)
class DetectionResult:
    """Explain's answer for B images: their detections with heatmaps, and the device time."""

    detections: tuple[Detections, ...]
    compute_seconds: float

    @staticmethod
    def concat(parts: list[DetectionResult]) -> DetectionResult:
        """Join per-chunk results along the batch axis."""
        return DetectionResult(
            detections=sum((p.detections for p in parts), ()),
            compute_seconds=sum(p.compute_seconds for p in parts),
        )

    def rows(self) -> list[DetectionResult]:
        """One B = 1 result per image."""
        return [DetectionResult((d,), self.compute_seconds) for d in self.detections]

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (the result cache's measure of size)."""
        return sum(d.nbytes for d in self.detections)
