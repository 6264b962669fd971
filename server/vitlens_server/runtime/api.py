"""The data plane's interface: domain requests in, domain replies out (no torch, no protobuf).

`rpc` decodes a protobuf request into one of the queries below, awaits the `DataPlaneApi`
method and encodes what comes back; `runtime.plane.DataPlane` implements it. Everything here is
a frozen dataclass over Python values and numpy arrays.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from vitlens_server.domain import (
    ExplainResult,
    ImageInput,
    MetricSummary,
    ParamInfo,
    Predictions,
    Progress,
    RegionsInput,
    TargetSpec,
)
from vitlens_server.domain_detection import DetectionQuery, DetectionResult

__all__ = [
    "DataPlaneApi",
    "EvaluateQuery",
    "ExplainQuery",
    "ExplainReply",
    "InlineSample",
    "MethodCard",
    "ModalityCard",
    "ModelCard",
    "PredictQuery",
    "PredictReply",
    "Timing",
]


@dataclass(frozen=True)
class ExplainQuery:
    """Explain ``images`` with ``method`` ("" for the default) on ``model`` ("" likewise).

    ``deadline`` is a `time.monotonic` instant, or None for the server's default.
    """

    images: tuple[ImageInput, ...]
    model: str = ""
    method: str = ""
    method_options: Mapping[str, Any] = field(default_factory=dict)
    target: TargetSpec = field(default_factory=TargetSpec)
    grid: Literal["tokens", "input"] = "tokens"
    return_relevance: bool = False
    top_k_predictions: int = 0  # 0: the server's default
    output_dtype: Literal["float32", "float16"] = "float32"
    deadline: float | None = None
    texts: tuple[str, ...] = ()  # image-text models: explain every image against each
    questions: tuple[str, ...] = ()  # VQA models: one per image, or one for all
    regions: tuple[RegionsInput, ...] = ()  # VQA models on regions: one per image
    detection: DetectionQuery | None = None  # detectors: which detections (None: the default)


@dataclass(frozen=True)
class PredictQuery:
    images: tuple[ImageInput, ...]
    model: str = ""
    top_k: int = 0  # 0: the server's default
    deadline: float | None = None
    prompts: tuple[str, ...] = ()  # image-text models: classify against these
    questions: tuple[str, ...] = ()  # VQA models: one per image, or one for all
    regions: tuple[RegionsInput, ...] = ()  # VQA models on regions: one per image
    detection_threshold: float | None = None  # detectors: None for the default


@dataclass(frozen=True)
class InlineSample:
    """An Evaluate sample sent in the request; ``mask`` (H, W) is nonzero on the object."""

    image: ImageInput
    label: int
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class EvaluateQuery:
    """Score ``methods`` with ``metrics`` on one dataset: ``synthetic`` (a spec such as
    ``synthetic:500``), ``server_path`` (a folder under an allowed root) or ``inline``."""

    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    model: str = ""
    synthetic: str | None = None
    server_path: str | None = None
    inline: tuple[InlineSample, ...] | None = None
    limit: int = 0  # 0: the whole dataset
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    metric_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    explain_label: bool = False


@dataclass(frozen=True)
class Timing:
    preprocess_s: float
    queue_s: float
    compute_s: float
    total_s: float


@dataclass(frozen=True)
class ExplainReply:
    """One B = 1 `ExplainResult` per image of the query, in its order."""

    model: str
    method: str
    labels: tuple[str, ...]  # the model's class names
    ids: tuple[str, ...]
    results: tuple[ExplainResult | DetectionResult, ...]
    timing: Timing


@dataclass(frozen=True)
class PredictReply:
    model: str
    labels: tuple[str, ...]
    ids: tuple[str, ...]
    predictions: Predictions  # (B, k)
    timing: Timing


@dataclass(frozen=True)
class MethodCard:
    """A method as GetModel describes it."""

    name: str
    description: str
    passes: tuple[str, ...]
    class_specific: bool
    relevance_matrix: bool
    parameters: tuple[ParamInfo, ...]
    modalities: tuple[str, ...] = ("image",)  # the token sets it returns relevance for


@dataclass(frozen=True)
class ModalityCard:
    """A token set the model attends over: ``image`` (prefix + patches, or regions), ``text``
    or (single-stream VQA models) ``joint``."""

    name: str
    num_tokens: int
    description: str


@dataclass(frozen=True)
class ModelCard:
    """A served model as GetModel describes it; ``methods``: those Explain accepts for it."""

    name: str
    architecture: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    patch_size: tuple[int, int]
    patch_grid: tuple[int, int]
    num_prefix_tokens: int
    num_layers: int
    num_heads: int
    labels: tuple[str, ...]
    methods: tuple[MethodCard, ...]
    weights_source: str
    weights_random: bool
    weights_sha256: str
    weights_metadata: Mapping[str, str]
    device: str
    readout: str
    task: Literal[
        "classification", "image_text_similarity", "visual_question_answering", "object_detection"
    ] = "classification"
    modalities: tuple[ModalityCard, ...] = ()
    prompt_template: str = ""  # image-text models: how labels become prompts
    visual_input: str = ""  # VQA models: "pixels" or "regions"
    region_feature_dim: int = 0  # VQA models on regions: F
    stream_architecture: str = ""  # VQA models: "single_stream" or "two_stream"


class DataPlaneApi(Protocol):
    """What the RPC layer calls. Errors are `vitlens_server.errors.VitlensError`s."""

    @property
    def default_model(self) -> str: ...

    @property
    def method_names(self) -> frozenset[str]: ...

    def models(self) -> Sequence[ModelCard]: ...

    def model(self, name: str) -> ModelCard: ...

    async def explain(self, query: ExplainQuery) -> ExplainReply: ...

    async def predict(self, query: PredictQuery) -> PredictReply: ...

    def evaluate(self, query: EvaluateQuery) -> AsyncIterator[Progress | MetricSummary]: ...
