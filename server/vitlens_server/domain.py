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

from vitlens_server.domain_detection import Detections
from vitlens_server.errors import InvalidArgument

__all__ = [
    "ExplainResult",
    "ImageInput",
    "MetricSummary",
    "ParamInfo",
    "Predictions",
    "Progress",
    "Summary",
    "TargetSpec",
    "TextRelevance",
]


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One image as the caller sent it: an encoded file, or a pixel array.

    Attributes:
        id: the caller's name for it, echoed in the reply.
        encoded: PNG/JPEG/... bytes, or None.
        pixels: (H, W), (H, W, 1) or (H, W, 3) array (uint8, or float in [0, 1]), or None.
        where: how the request names it in error messages (``images[2]``).
    """

    id: str = ""
    encoded: bytes | None = None
    pixels: np.ndarray | None = None
    where: str = "image"

    def content(self) -> bytes:
        """What identifies the image's content (not its id), for the result cache."""
        if self.pixels is None:
            return b"encoded:" + (self.encoded or b"")
        header = f"pixels:{self.pixels.dtype}:{list(self.pixels.shape)}:".encode()
        return header + self.pixels.tobytes()


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

    def check(self, count: int, model: str, noun: str = "class", nouns: str = "classes") -> None:
        """Refuse a ``top_k`` or an index outside the ``count`` classes of ``model`` (or what
        else it ranks: ``noun``/``nouns``) with INVALID_ARGUMENT."""
        if self.kind == "top_k" and not 1 <= self.k <= count:
            raise InvalidArgument(
                f"target.top_k must lie in [1, {count}]; got {self.k}", field="target.top_k"
            )
        for index in self.indices:
            if not 0 <= index < count:
                raise InvalidArgument(
                    f"{noun} index {index} is out of range; model {model!r} has {count} "
                    f"{nouns} (0..{count - 1})",
                    field="target",
                )

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
    """Top-k classes per image: ``indices``, ``probabilities``, ``logits`` all (B, k).

    Detectors: k = 0, and ``detections`` holds each image's `Detections` (without heatmaps).
    """

    indices: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray
    detections: tuple[Detections, ...] | None = None

    @staticmethod
    def concat(parts: list[Predictions]) -> Predictions:
        """Join per-chunk predictions along the batch axis."""
        detections = None
        if parts[0].detections is not None:
            detections = sum((p.detections or () for p in parts), ())
        return Predictions(
            indices=np.concatenate([p.indices for p in parts]),
            probabilities=np.concatenate([p.probabilities for p in parts]),
            logits=np.concatenate([p.logits for p in parts]),
            detections=detections,
        )

    def row(self, b: int) -> Predictions:
        """Image ``b``'s predictions as a B = 1 copy."""
        rows = slice(b, b + 1)
        return Predictions(
            self.indices[rows].copy(),
            self.probabilities[rows].copy(),
            self.logits[rows].copy(),
            None if self.detections is None else (self.detections[b],),
        )


@dataclass(frozen=True)
class TextRelevance:
    """The relevance of one text's tokens for one image-text similarity.

    Attributes:
        text: the text as the model read it (a request text, or a label's prompt).
        tokens: its readable tokens in order, the start and end tokens excluded.
        relevance: (len(tokens),) float32, one value per token.
    """

    text: str
    tokens: tuple[str, ...]
    relevance: np.ndarray


@dataclass(frozen=True)
class RelevanceMatrix:
    """R^{queries keys}, (|queries|, |keys|) float: how much each token of ``keys`` matters for
    each token of ``queries`` (token sets ``"text"``, ``"image"``, ``"joint"``)."""

    queries: str
    keys: str
    matrix: np.ndarray


@dataclass(frozen=True)
class RegionsInput:
    """One image's detector regions for a region-based VQA model.

    Attributes:
        features: (R, F) float32 region features.
        boxes: (R, 4) float32 (x1, y1, x2, y2) as fractions of the image's width and height.
        where: how the request names them in error messages (``regions[2]``).
    """

    features: np.ndarray
    boxes: np.ndarray
    where: str = "regions"


@dataclass(frozen=True)
class ExplainResult:
    """Host arrays for a batch of B images with K explained classes each.

    Attributes:
        predictions: top-k predictions.
        targets: (B, K) explained class indices, with their (B, K) probabilities and logits.
        heatmaps: (B, K, h, w) raw maps at the token grid, the input resolution, or (grid
            "native") the method's own.
        relevance: (B, K, N, N) token relevance, when requested (image-text models: the
            image tower's).
        compute_seconds: device time of the passes and the method.
        texts: image-text models: per image, per explanation, the text tokens' relevance
            (B x K); VQA models: the question tokens'; None for classifiers.
        regions: VQA models on request regions: per image, (K, R_b) the relevance of its R_b
            regions (``heatmaps`` is then (B, K, 0, 0)); None otherwise.
        matrices: VQA models, when requested: per image, per explanation, every relevance
            matrix (B x K x pairs); None otherwise.
    """

    predictions: Predictions
    targets: np.ndarray
    target_probabilities: np.ndarray
    target_logits: np.ndarray
    heatmaps: np.ndarray
    relevance: np.ndarray | None
    compute_seconds: float
    texts: tuple[tuple[TextRelevance, ...], ...] | None = None
    regions: tuple[np.ndarray, ...] | None = None
    matrices: tuple[tuple[tuple[RelevanceMatrix, ...], ...], ...] | None = None

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
            texts=None if parts[0].texts is None else sum((p.texts for p in parts), ()),
            regions=None if parts[0].regions is None else sum((p.regions for p in parts), ()),
            matrices=None if parts[0].matrices is None else sum((p.matrices for p in parts), ()),
        )

    def rows(self) -> list[ExplainResult]:
        """One B = 1 result per image (copies, so one image's result never pins the batch's)."""
        return [
            ExplainResult(
                predictions=self.predictions.row(b),
                targets=self.targets[b : b + 1].copy(),
                target_probabilities=self.target_probabilities[b : b + 1].copy(),
                target_logits=self.target_logits[b : b + 1].copy(),
                heatmaps=self.heatmaps[b : b + 1].copy(),
                relevance=None if self.relevance is None else self.relevance[b : b + 1].copy(),
                compute_seconds=self.compute_seconds,
                texts=None if self.texts is None else (self.texts[b],),
                regions=None if self.regions is None else (self.regions[b],),
                matrices=None if self.matrices is None else (self.matrices[b],),
            )
            for b in range(len(self.targets))
        ]

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (the result cache's measure of size)."""
        p = self.predictions
        arrays = [p.indices, p.probabilities, p.logits, self.targets, self.heatmaps]
        arrays += [self.target_probabilities, self.target_logits]
        if self.relevance is not None:
            arrays.append(self.relevance)
        arrays += list(self.regions or ())
        arrays += [m.matrix for row in self.matrices or () for rank in row for m in rank]
        text_bytes = sum(
            t.relevance.nbytes + sum(len(x) for x in t.tokens) + len(t.text)
            for row in self.texts or ()
            for t in row
        )
        return sum(a.nbytes for a in arrays) + text_bytes


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
