"""Result types returned by the SDK: frozen dataclasses built from the response messages.

Tensors arrive as numpy arrays in the dtype the request asked for (float32 or float16). The
arrays are owned copies; the dataclasses are frozen (fields cannot be reassigned) and those
holding arrays compare by identity. (The model descriptions, `ModelInfo` and its parts, live in
`vitlens.model_info` and are importable from here too.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, overload

import numpy as np

from vitlens.model_info import MethodInfo, MethodParameter, ModelInfo, Weights
from vitlens.tensors import tensor_to_numpy
from vitlens.v1 import vitlens_pb2

if TYPE_CHECKING:  # vitlens.detection imports Prediction from here
    from vitlens.detection import Detection

__all__ = [
    "Classification",
    "ExplainResult",
    "Explanation",
    "ImageExplanation",
    "MethodInfo",
    "MethodParameter",
    "ModelInfo",
    "Prediction",
    "TextRelevance",
    "Timing",
    "Weights",
    "normalized_heatmap",
]


def normalized_heatmap(heatmap: np.ndarray) -> np.ndarray:
    """``heatmap`` min-max scaled to [0, 1] as float32, same shape; a constant (or empty) map
    gives zeros, NaN gives 0."""
    h = np.array(heatmap, dtype=np.float32)  # a copy
    if h.size == 0:
        return h
    lo, hi = float(np.nanmin(h)), float(np.nanmax(h))
    span = hi - lo
    if not np.isfinite(span) or span <= 0.0:
        return np.zeros_like(h)
    return np.nan_to_num((h - lo) / span, nan=0.0)


def _detections(messages: Iterable[vitlens_pb2.Detection]) -> tuple[Detection, ...]:
    from vitlens.detection import Detection  # imported here: it imports this module

    return tuple(Detection.from_proto(d) for d in messages)


@dataclass(frozen=True)
class Prediction:
    """One class score: index into `ModelInfo.labels`, its label, softmax probability, logit."""

    index: int
    label: str
    probability: float
    logit: float

    @classmethod
    def from_proto(cls, p: vitlens_pb2.Prediction) -> Prediction:
        return cls(index=p.index, label=p.label, probability=p.probability, logit=p.logit)


@dataclass(frozen=True)
class Timing:
    """Server-side time spent on a request, in seconds."""

    preprocess_seconds: float
    queue_seconds: float
    compute_seconds: float
    total_seconds: float

    @classmethod
    def from_proto(cls, t: vitlens_pb2.Timing) -> Timing:
        return cls(
            preprocess_seconds=t.preprocess_seconds,
            queue_seconds=t.queue_seconds,
            compute_seconds=t.compute_seconds,
            total_seconds=t.total_seconds,
        )


@dataclass(frozen=True, eq=False)
class TextRelevance:
    """The relevance of one text's tokens: for one image-text similarity (image-text models),
    or of the question's tokens for one answer (VQA models).

    Attributes:
        text: the text (a request's text, a label's prompt, or the question).
        tokens: its readable tokens, start and end tokens excluded.
        relevance: (len(tokens),) float32, one value per token.
    """

    text: str
    tokens: tuple[str, ...]
    relevance: np.ndarray

    @classmethod
    def from_proto(cls, t: vitlens_pb2.TextRelevance) -> TextRelevance:
        return cls(t.text, tuple(t.tokens), np.asarray(t.relevance, dtype=np.float32))


@dataclass(frozen=True, eq=False)
class Explanation:
    """One explained class (or, for image-text models, one text) of one image.

    Attributes:
        target: the class explained; for image-text models with texts, the text (index into
            the request's texts, label = the text, logit = the similarity logit).
        heatmap: raw relevance map, (gh, gw) on the token grid or (H, W) on the input grid;
            larger means more relevant.
        relevance: token x token relevance (N, N), N = prefix tokens + gh * gw, when requested
            and the method has one; else None.
        text: image-text models: the text tokens' relevance; VQA models: the question
            tokens' (also `question`); None for classifiers.
        region_relevance: VQA models on request regions: (R,) float32, one value per region
            in request order (``heatmap`` is then empty, (0, 0)); else None.
        matrices: VQA models, when ``relevance`` was requested: every relevance matrix by its
            (queries, keys) token sets, e.g. ``matrices["text", "image"]`` (|text|, |image|);
            empty otherwise.
    """

    target: Prediction
    heatmap: np.ndarray
    relevance: np.ndarray | None = None
    text: TextRelevance | None = None
    region_relevance: np.ndarray | None = None
    matrices: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, e: vitlens_pb2.Explanation) -> Explanation:
        return cls(
            target=Prediction.from_proto(e.target),
            heatmap=tensor_to_numpy(e.heatmap)
            if e.HasField("heatmap")
            else np.zeros((0, 0), np.float32),
            relevance=tensor_to_numpy(e.relevance) if e.HasField("relevance") else None,
            text=TextRelevance.from_proto(e.text) if e.HasField("text") else None,
            region_relevance=np.asarray(e.region_relevance, dtype=np.float32)
            if e.region_relevance
            else None,
            matrices={(m.queries, m.keys): tensor_to_numpy(m.matrix) for m in e.matrices},
        )

    @property
    def question(self) -> TextRelevance | None:
        """VQA models: the question's tokens and their relevance for this answer (`text`)."""
        return self.text

    def normalized(self) -> np.ndarray:
        """The heatmap min-max scaled to [0, 1] as float32, same shape; a constant map gives
        zeros."""
        return normalized_heatmap(self.heatmap)


@dataclass(frozen=True, eq=False)
class ImageExplanation:
    """Predictions and explanations for one request image.

    Attributes:
        id: the request image's id.
        predictions: most probable classes, descending.
        explanations: one per explained class (one unless top-k targets were asked for);
            empty for object detection models.
        detections: object detection models: the explained detections, most probable first,
            each with its heatmap (`vitlens.Detection`); empty for other models.
    """

    id: str
    predictions: tuple[Prediction, ...]
    explanations: tuple[Explanation, ...]
    detections: tuple[Detection, ...] = ()

    @classmethod
    def from_proto(cls, r: vitlens_pb2.ImageExplanation) -> ImageExplanation:
        return cls(
            id=r.id,
            predictions=tuple(Prediction.from_proto(p) for p in r.predictions),
            explanations=tuple(Explanation.from_proto(e) for e in r.explanations),
            detections=_detections(r.detections),
        )

    @property
    def top(self) -> Prediction:
        """The most probable class."""
        if not self.predictions:
            raise ValueError(f"image {self.id!r} has no predictions")
        return self.predictions[0]

    @property
    def heatmap(self) -> np.ndarray:
        """The first explanation's raw heatmap, (gh, gw) or (H, W)."""
        if not self.explanations:
            detections = " (a detector's: see .detections)" if self.detections else ""
            raise ValueError(f"image {self.id!r} has no explanations{detections}")
        return self.explanations[0].heatmap


@dataclass(frozen=True, eq=False)
class ExplainResult(Sequence[ImageExplanation]):
    """The answer to one explain call; a sequence of `ImageExplanation` in request order.

    Attributes:
        model: the model actually used (defaults resolved).
        method: the method actually used.
        results: one entry per request image, in request order.
        timing: server-side time spent.
    """

    model: str
    method: str
    results: tuple[ImageExplanation, ...]
    timing: Timing

    @classmethod
    def from_proto(cls, r: vitlens_pb2.ExplainResponse) -> ExplainResult:
        return cls(
            model=r.model,
            method=r.method,
            results=tuple(ImageExplanation.from_proto(x) for x in r.results),
            timing=Timing.from_proto(r.timing),
        )

    def __len__(self) -> int:
        return len(self.results)

    @overload
    def __getitem__(self, i: int) -> ImageExplanation: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[ImageExplanation, ...]: ...
    def __getitem__(self, i: int | slice) -> ImageExplanation | tuple[ImageExplanation, ...]:
        return self.results[i]

    def __iter__(self) -> Iterator[ImageExplanation]:
        return iter(self.results)


@dataclass(frozen=True)
class Classification:
    """Predictions for one request image, most probable first.

    Attributes:
        id: the request image's id.
        predictions: most probable classes, descending; empty for object detection models.
        detections: object detection models: every detection above the request's
            ``detection_threshold``, most probable first, without heatmaps; else empty.
    """

    id: str
    predictions: tuple[Prediction, ...]
    detections: tuple[Detection, ...] = ()

    @classmethod
    def from_proto(cls, c: vitlens_pb2.Classification) -> Classification:
        return cls(
            id=c.id,
            predictions=tuple(Prediction.from_proto(p) for p in c.predictions),
            detections=_detections(c.detections),
        )

    @property
    def top(self) -> Prediction:
        """The most probable class."""
        if not self.predictions:
            raise ValueError(f"image {self.id!r} has no predictions")
        return self.predictions[0]
