"""The SDK's object detection side: boxes, detections and the request's detection options.

A detection model (`ModelInfo.object_detection`, a DETR-style encoder-decoder) answers each
image with detections: an object query whose most probable class (not "no object") is
confident enough, its class over `ModelInfo.labels` and its box. `Client.predict` returns them
in `Classification.detections`; `Client.explain` in `ImageExplanation.detections`, each with its
heatmap over the image and its relevance of every object query. Which detections are returned
and explained is chosen by `build_detection_options` (``detection_threshold``,
``max_detections``, ``queries``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vitlens.results import Prediction, normalized_heatmap
from vitlens.tensors import tensor_to_numpy
from vitlens.v1 import vitlens_pb2

__all__ = [
    "Box",
    "Detection",
    "build_detection_options",
    "check_threshold",
]

_EDGE_TOLERANCE_PX = 1e-3  # float32 box fractions times the image size, rounding error


@dataclass(frozen=True)
class Box:
    """An axis-aligned box as fractions of the image's width (x) and height (y), in [0, 1].

    Attributes:
        x1, y1: the top-left corner.
        x2, y2: the bottom-right corner (x1 <= x2, y1 <= y2).
    """

    x1: float
    y1: float
    x2: float
    y2: float

    @classmethod
    def from_proto(cls, b: vitlens_pb2.Box) -> Box:
        return cls(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2)

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The box on a ``width`` x ``height`` image: (x0, y0, x1, y1) pixel bounds, x1 and y1
        exclusive (``array[y0:y1, x0:x1]`` is the box), clipped to the image and at least one
        pixel wide and high. A pixel the box covers in part is in it; edges within
        `_EDGE_TOLERANCE_PX` of a pixel boundary (float32 fractions on the wire) snap to it.

        Raises:
            ValueError: ``width`` or ``height`` below 1.
        """
        if width < 1 or height < 1:
            raise ValueError(f"image size must be at least 1 x 1, got {width} x {height}")
        eps = _EDGE_TOLERANCE_PX
        x0 = min(max(math.floor(self.x1 * width + eps), 0), width - 1)
        y0 = min(max(math.floor(self.y1 * height + eps), 0), height - 1)
        x1 = min(max(math.ceil(self.x2 * width - eps), x0 + 1), width)
        y1 = min(max(math.ceil(self.y2 * height - eps), y0 + 1), height)
        return x0, y0, x1, y1

    @property
    def area(self) -> float:
        """The box's share of the image, in [0, 1]."""
        return max(self.x2 - self.x1, 0.0) * max(self.y2 - self.y1, 0.0)

    def __str__(self) -> str:
        return f"({self.x1:.3f}, {self.y1:.3f}, {self.x2:.3f}, {self.y2:.3f})"


@dataclass(frozen=True, eq=False)
class Detection:
    """One object a detector found in one image, and (Explain) why.

    Attributes:
        query: the object query that made it (index into ModelInfo's "queries" modality).
        prediction: its most probable object class (index into `ModelInfo.labels`); the
            probability is the softmax over the classes and "no object".
        box: where it is, as fractions of the image.
        heatmap: Explain only: the detection's raw relevance over the image, (gh, gw) on the
            encoder's token grid or (H, W) on the input grid (``grid="input"``); larger means
            more relevant. None from Predict.
        query_relevance: Explain only: (Q,) float32, this detection's relevance of each of the
            Q object queries; None when the server sent none.
    """

    query: int
    prediction: Prediction
    box: Box
    heatmap: np.ndarray | None = None
    query_relevance: np.ndarray | None = None

    @classmethod
    def from_proto(cls, d: vitlens_pb2.Detection) -> Detection:
        return cls(
            query=d.query,
            prediction=Prediction.from_proto(d.prediction),
            box=Box.from_proto(d.box),
            heatmap=tensor_to_numpy(d.heatmap) if d.HasField("heatmap") else None,
            query_relevance=np.asarray(d.query_relevance, dtype=np.float32)
            if d.query_relevance
            else None,
        )

    @property
    def label(self) -> str:
        """The class's label (its index when the server sent no label)."""
        return self.prediction.label or str(self.prediction.index)

    @property
    def probability(self) -> float:
        """The class's probability, the detection's score."""
        return self.prediction.probability

    def normalized(self) -> np.ndarray | None:
        """The heatmap min-max scaled to [0, 1] as float32, same shape (a constant map gives
        zeros); None without a heatmap."""
        return None if self.heatmap is None else normalized_heatmap(self.heatmap)

    def __str__(self) -> str:
        return f"{self.label} {self.probability:.1%} box {self.box} (query {self.query})"


def check_threshold(value: float, what: str = "detection_threshold") -> float:
    """``value`` as a float in [0, 1); 0 keeps every query (unset: the server's 0.5).

    Raises:
        TypeError: not a real number (a bool included).
        ValueError: outside [0, 1), or NaN.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    threshold = float(value)
    if not 0.0 <= threshold < 1.0:  # NaN fails both comparisons
        raise ValueError(
            f"{what} must be in [0, 1): the least probability of a detection, got {value!r}"
        )
    return threshold


def _count(value: int, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got bool")
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None
    if count < 0:
        raise ValueError(f"{what} must be at least 0, got {count}")
    return count


def build_detection_options(
    threshold: float | None = None,
    max_detections: int = 0,
    queries: Sequence[int] | None = None,
) -> vitlens_pb2.DetectionOptions | None:
    """The request's `DetectionOptions`, or None when every argument has its default (the
    server then explains every detection above 0.5).

    Args:
        threshold: the least probability of a detection, in [0, 1) (0: every query; None: the
            server's 0.5).
        max_detections: at most this many detections per image, most probable first (0: all).
        queries: explain these object queries of every image instead, whatever their
            probability; at least one, each at least 0 and none twice (the server checks the
            upper bound, ModelInfo's "queries" modality).

    Raises:
        TypeError: an argument of the wrong type (one string for ``queries`` included).
        ValueError: a value out of range, no queries, a repeated query, or ``threshold`` with
            ``queries`` (the threshold would be ignored).
    """
    count = _count(max_detections, "max_detections")
    if threshold is None and count == 0 and queries is None:
        return None
    options = vitlens_pb2.DetectionOptions(max_detections=count)
    if threshold is not None:
        options.threshold = check_threshold(threshold, "detection_threshold")
    if queries is not None:
        if threshold is not None:
            raise ValueError(
                "pass either detection_threshold or queries, not both: explaining chosen "
                "queries ignores the threshold"
            )
        if isinstance(queries, str | bytes):
            raise TypeError("queries must be a sequence of ints")
        indices = [_count(q, "queries") for q in queries]
        if not indices:
            raise ValueError("queries is empty: give at least one object query, or None")
        if len(set(indices)) != len(indices):
            raise ValueError(f"queries repeats a query: {indices}")
        options.queries.extend(indices)
    return options
