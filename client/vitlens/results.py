"""Result types returned by the SDK: frozen dataclasses built from the response messages.

Tensors arrive as numpy arrays in the dtype the request asked for (float32 or float16). The
arrays are owned copies; the dataclasses are frozen (fields cannot be reassigned) and those
holding arrays compare by identity.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from vitlens.tensors import tensor_to_numpy
from vitlens.v1 import vitlens_pb2

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
]


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
    """Image-text models: the relevance of one text's tokens for one image-text similarity.

    Attributes:
        text: the text (a request's text, or a label's prompt).
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
        text: image-text models: the text tokens' relevance; None for classifiers.
    """

    target: Prediction
    heatmap: np.ndarray
    relevance: np.ndarray | None = None
    text: TextRelevance | None = None

    @classmethod
    def from_proto(cls, e: vitlens_pb2.Explanation) -> Explanation:
        return cls(
            target=Prediction.from_proto(e.target),
            heatmap=tensor_to_numpy(e.heatmap),
            relevance=tensor_to_numpy(e.relevance) if e.HasField("relevance") else None,
            text=TextRelevance.from_proto(e.text) if e.HasField("text") else None,
        )

    def normalized(self) -> np.ndarray:
        """The heatmap min-max scaled to [0, 1] as float32, same shape; a constant map gives
        zeros."""
        h = self.heatmap.astype(np.float32)
        if h.size == 0:
            return h
        lo, hi = float(np.nanmin(h)), float(np.nanmax(h))
        span = hi - lo
        if not np.isfinite(span) or span <= 0.0:
            return np.zeros_like(h)
        return np.nan_to_num((h - lo) / span, nan=0.0)


@dataclass(frozen=True, eq=False)
class ImageExplanation:
    """Predictions and explanations for one request image.

    Attributes:
        id: the request image's id.
        predictions: most probable classes, descending.
        explanations: one per explained class (one unless top-k targets were asked for).
    """

    id: str
    predictions: tuple[Prediction, ...]
    explanations: tuple[Explanation, ...]

    @classmethod
    def from_proto(cls, r: vitlens_pb2.ImageExplanation) -> ImageExplanation:
        return cls(
            id=r.id,
            predictions=tuple(Prediction.from_proto(p) for p in r.predictions),
            explanations=tuple(Explanation.from_proto(e) for e in r.explanations),
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
            raise ValueError(f"image {self.id!r} has no explanations")
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
    """Predictions for one request image, most probable first."""

    id: str
    predictions: tuple[Prediction, ...]

    @classmethod
    def from_proto(cls, c: vitlens_pb2.Classification) -> Classification:
        return cls(id=c.id, predictions=tuple(Prediction.from_proto(p) for p in c.predictions))

    @property
    def top(self) -> Prediction:
        """The most probable class."""
        if not self.predictions:
            raise ValueError(f"image {self.id!r} has no predictions")
        return self.predictions[0]


@dataclass(frozen=True)
class MethodParameter:
    """One accepted `method_options` entry; ``type`` is "float", "int", "bool" or "str"."""

    name: str
    type: str
    default_json: str
    description: str
    choices: tuple[str, ...]

    @classmethod
    def from_proto(cls, p: vitlens_pb2.MethodParameter) -> MethodParameter:
        return cls(
            name=p.name,
            type=p.type,
            default_json=p.default_json,
            description=p.description,
            choices=tuple(p.choices),
        )

    @property
    def default(self) -> Any:
        """The decoded default value (None when the server sent none)."""
        return json.loads(self.default_json) if self.default_json else None


@dataclass(frozen=True)
class MethodInfo:
    """An explanation method a model supports, with the passes it needs and its parameters."""

    name: str
    description: str
    passes: tuple[str, ...]
    class_specific: bool
    relevance_matrix: bool
    parameters: tuple[MethodParameter, ...]
    modalities: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, m: vitlens_pb2.MethodInfo) -> MethodInfo:
        return cls(
            name=m.name,
            description=m.description,
            passes=tuple(m.passes),
            class_specific=m.class_specific,
            relevance_matrix=m.relevance_matrix,
            parameters=tuple(MethodParameter.from_proto(p) for p in m.parameters),
            modalities=tuple(m.modalities),
        )


@dataclass(frozen=True)
class Weights:
    """Where a model's weights came from; ``random`` means predictions are meaningless."""

    source: str
    random: bool
    sha256: str
    metadata: dict[str, str]

    @classmethod
    def from_proto(cls, w: vitlens_pb2.Weights) -> Weights:
        return cls(source=w.source, random=w.random, sha256=w.sha256, metadata=dict(w.metadata))


@dataclass(frozen=True)
class ModelInfo:
    """A served model's geometry, labels and methods.

    Attributes:
        input_size: (channels, height, width).
        patch_size: patch (height, width) in pixels.
        patch_grid: token grid (gh, gw).
        num_prefix_tokens: tokens before the patch tokens; N = num_prefix_tokens + gh * gw.
        labels: class labels; index i names class i.
        readout: how the classifier reads the tokens: "token", "distilled", "avg" or another
            timm pooling (then methods that read a fixed token row are not offered).
        task: "classification" or "image_text_similarity" (a CLIP-style dual encoder).
        modalities: the token sets, name → number of tokens ({"image": N} or, for image-text
            models, also "text": the context length).
        prompt_template: image-text models: how labels become prompts ("a photo of a {}.").
    """

    name: str
    architecture: str
    input_size: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    patch_size: tuple[int, ...]
    patch_grid: tuple[int, ...]
    num_prefix_tokens: int
    num_layers: int
    num_heads: int
    labels: tuple[str, ...]
    methods: tuple[MethodInfo, ...]
    weights: Weights
    device: str
    readout: str
    task: str = "classification"
    modalities: dict[str, int] | None = None
    prompt_template: str = ""

    @classmethod
    def from_proto(cls, m: vitlens_pb2.ModelInfo) -> ModelInfo:
        return cls(
            name=m.name,
            architecture=m.architecture,
            input_size=tuple(m.input_size),
            mean=tuple(m.mean),
            std=tuple(m.std),
            patch_size=tuple(m.patch_size),
            patch_grid=tuple(m.patch_grid),
            num_prefix_tokens=m.num_prefix_tokens,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            labels=tuple(m.labels),
            methods=tuple(MethodInfo.from_proto(x) for x in m.methods),
            weights=Weights.from_proto(m.weights),
            device=m.device,
            readout=m.readout,
            task=_TASKS.get(m.task, "unspecified"),
            modalities={x.name: x.num_tokens for x in m.modalities},
            prompt_template=m.prompt_template,
        )

    @property
    def image_text(self) -> bool:
        """Whether the model scores images against texts (Explain ``texts=``, Predict
        ``prompts=``)."""
        return self.task == "image_text_similarity"

    @property
    def random_weights(self) -> bool:
        """True when the weights are random initialisation (for testing only)."""
        return self.weights.random

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def num_tokens(self) -> int:
        """N = prefix tokens + gh * gw."""
        gh, gw = self.patch_grid if len(self.patch_grid) == 2 else (0, 0)
        return self.num_prefix_tokens + gh * gw

    def method(self, name: str) -> MethodInfo:
        """The `MethodInfo` called ``name``; KeyError listing the available ones otherwise."""
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"model {self.name!r} has no method {name!r}; has {self.method_names}")

    @property
    def method_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.methods)


_TASKS = {
    vitlens_pb2.TASK_CLASSIFICATION: "classification",
    vitlens_pb2.TASK_IMAGE_TEXT_SIMILARITY: "image_text_similarity",
}
