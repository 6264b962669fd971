"""What GetModel and ListModels say about a served model: geometry, labels, methods, weights,
task (classification, image-text similarity, visual question answering, object detection)
and token sets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vitlens.v1 import vitlens_pb2

__all__ = ["MethodInfo", "MethodParameter", "ModelInfo", "Weights"]


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
        task: "classification", "image_text_similarity" (a CLIP-style dual encoder),
            "visual_question_answering" (labels are then the answers) or "object_detection"
            (a DETR-style detector; labels are the object classes).
        modalities: the token sets, name → number of tokens ({"image": N} or, for image-text
            and VQA models, also "text": the context length; single-stream VQA models also
            "joint"; detectors "image", the encoder's tokens, and "queries", the decoder's
            object queries).
        prompt_template: image-text models: how labels become prompts ("a photo of a {}.").
        visual_input: VQA models: "pixels" (the model reads the image) or "regions" (explain
            and answer take one `vitlens.Regions` per image); "" for other tasks.
        region_feature_dim: VQA models reading regions: the feature width F; else 0.
        stream_architecture: VQA models: "single_stream" or "two_stream"; "" for others.
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
    visual_input: str = ""
    region_feature_dim: int = 0
    stream_architecture: str = ""

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
            visual_input=m.visual_input,
            region_feature_dim=m.region_feature_dim,
            stream_architecture=m.stream_architecture,
        )

    @property
    def image_text(self) -> bool:
        """Whether the model scores images against texts (Explain ``texts=``, Predict
        ``prompts=``)."""
        return self.task == "image_text_similarity"

    @property
    def vqa(self) -> bool:
        """Whether the model answers questions about images (`Client.answer`, Explain
        ``questions=``)."""
        return self.task == "visual_question_answering"

    @property
    def object_detection(self) -> bool:
        """Whether the model detects objects (`Classification.detections`, Explain
        ``detection_threshold=`` / ``queries=``, `ImageExplanation.detections`)."""
        return self.task == "object_detection"

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
    vitlens_pb2.TASK_VISUAL_QUESTION_ANSWERING: "visual_question_answering",
    vitlens_pb2.TASK_OBJECT_DETECTION: "object_detection",
}
