"""The data plane's detection side: options checked, jobs resolved, the card and the version.

explain_job     an `ExplainQuery` on a detector → `DetectionExplainJob` (pixels still empty):
                the method and its options (generic's ``averaging``), the detection options
                (threshold in [0, 1), a cap, or queries below Q), no target, texts, questions
                or regions
predict_job     a `PredictQuery` on a detector → `DetectionPredictJob`
detection_card  GetModel's answer: task, modalities (image tokens, queries), labels, methods
"""

from __future__ import annotations

import json

import torch

from vitlens_server.domain_detection import DetectionQuery
from vitlens_server.errors import InvalidArgument, clip
from vitlens_server.explain.detection import DETECTION_METHODS
from vitlens_server.explain.detection_batch import (
    DEFAULT_THRESHOLD,
    DetectionChoice,
    DetectionExplainJob,
    DetectionPredictJob,
)
from vitlens_server.explain.params import NoParams, describe_params, parse_params
from vitlens_server.models.detection_serving import LoadedDetector
from vitlens_server.runtime.api import (
    ExplainQuery,
    MethodCard,
    ModalityCard,
    ModelCard,
    PredictQuery,
)
from vitlens_server.runtime.vqa import GenericParams

__all__ = [
    "detection_card",
    "detection_version",
    "encoder_grid",
    "explain_job",
    "method_params",
    "predict_job",
]


def explain_job(served: LoadedDetector, query: ExplainQuery) -> tuple[DetectionExplainJob, object]:
    """The query as a checked job (its images still to be decoded: ``pixels`` empty) and the
    method's parsed options."""
    _refuse_other_inputs(served, query.texts, "texts", query.questions, query.regions)
    if query.target.kind != "predicted":
        raise InvalidArgument(
            f"detector {served.name!r} explains its detections: unset target and choose them "
            "with detection.threshold, detection.max_detections or detection.queries",
            field="target",
        )
    if query.return_relevance:
        raise InvalidArgument(
            f"detector {served.name!r} returns each detection's heatmap and query relevance; "
            "unset options.return_relevance",
            field="options.return_relevance",
        )
    name = query.method or "generic"
    if name not in DETECTION_METHODS:
        raise InvalidArgument(
            f"method {clip(name)} does not apply to detector {served.name!r}; use one of: "
            f"{', '.join(DETECTION_METHODS)}",
            field="method",
        )
    params = parse_params(
        method_params(name), query.method_options, method=name, field="options.method_options"
    )
    job = DetectionExplainJob(
        pixels=torch.empty(0),
        method=name,
        choice=_choice(served, query.detection),
        averaging=getattr(params, "averaging", "gradient"),
        grid=query.grid,
        output_dtype=query.output_dtype,
    )
    return job, params


def method_params(name: str) -> type:
    """A detection method's options: generic's head averaging; none for the others."""
    return GenericParams if name == "generic" else NoParams


def predict_job(served: LoadedDetector, query: PredictQuery) -> DetectionPredictJob:
    """The query as a checked job, its images still to be decoded (``pixels`` empty)."""
    _refuse_other_inputs(served, query.prompts, "prompts", query.questions, query.regions)
    threshold = _threshold(query.detection_threshold, "detection_threshold")
    return DetectionPredictJob(pixels=torch.empty(0), choice=DetectionChoice(threshold))


def _choice(served: LoadedDetector, options: DetectionQuery | None) -> DetectionChoice:
    if options is None:
        return DetectionChoice()
    queries = tuple(options.queries)
    count = served.adapter.num_queries
    for i, query in enumerate(queries):
        if not 0 <= query < count:
            raise InvalidArgument(
                f"detection.queries[{i}] is {query}; model {served.name!r} has {count} object "
                f"queries (0 to {count - 1})",
                field=f"detection.queries[{i}]",
            )
    if len(set(queries)) != len(queries):
        raise InvalidArgument("detection.queries repeats a query", field="detection.queries")
    threshold = _threshold(options.threshold, "detection.threshold")
    return DetectionChoice(threshold, options.max_detections, queries)


def _threshold(value: float | None, field: str) -> float:
    if value is None:
        return DEFAULT_THRESHOLD
    if not 0 <= value < 1:  # NaN fails too
        raise InvalidArgument(f"{field} is {value}; give a probability in [0, 1)", field=field)
    return float(value)


def _refuse_other_inputs(served: LoadedDetector, texts, texts_field, questions, regions) -> None:
    for field, given in ((texts_field, texts), ("questions", questions), ("regions", regions)):
        if given:
            raise InvalidArgument(
                f"{field} are not read by detector {served.name!r}, which takes images alone: "
                f"unset {field}",
                field=field,
            )


def detection_card(served: LoadedDetector) -> ModelCard:
    """GetModel's answer for a detector."""
    adapter = served.adapter
    methods = tuple(
        MethodCard(
            name=m.name,
            description=m.description,
            passes=("forward", "backward") if m.gradient else ("forward",),
            class_specific=m.class_specific,
            relevance_matrix=False,
            parameters=tuple(describe_params(method_params(m.name))),
            modalities=("image", "queries"),
        )
        for m in DETECTION_METHODS.values()
    )
    _, height, width = served.input_size
    grid = encoder_grid(served)
    patch = (height // grid[0], width // grid[1]) if all(grid) else (0, 0)
    modalities = (
        ModalityCard("image", grid[0] * grid[1], "the encoder's feature-map tokens, row-major"),
        ModalityCard("queries", adapter.num_queries, "the decoder's object queries"),
    )
    config = adapter.module.config
    return ModelCard(
        name=served.name,
        architecture=type(adapter.module).__name__,
        input_size=served.input_size,
        mean=served.mean,
        std=served.std,
        patch_size=patch,
        patch_grid=grid,
        num_prefix_tokens=0,
        num_layers=len(adapter.graph().edges),
        num_heads=int(config.encoder_attention_heads),
        labels=served.labels,
        methods=methods,
        weights_source=served.weights.source,
        weights_random=False,
        weights_sha256=served.weights.sha256,
        weights_metadata=dict(served.weights.metadata),
        device=str(served.device),
        readout="queries",
        task="object_detection",
        modalities=modalities,
    )


def detection_version(served: LoadedDetector) -> str:
    """What answers are keyed by: the weights and the labels."""
    return json.dumps([served.weights.source, served.weights.sha256, list(served.labels)])


def encoder_grid(served: LoadedDetector) -> tuple[int, int]:
    """The encoder's token grid for the model's input size, from one small forward pass."""
    _, height, width = served.input_size
    with torch.inference_mode():
        run = served.adapter.run(torch.zeros(1, 3, height, width, device=served.adapter.device))
    return run.grid
