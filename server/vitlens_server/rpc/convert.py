"""Protobuf messages ↔ the data plane's domain queries and replies (`runtime.api`).

Decoding checks only what the wire format itself can get wrong (a malformed tensor, an unknown
enum value, a target list of the wrong length); everything about models, methods and options is
the data plane's to judge. The visual question answering fields (questions, detector regions,
per-region relevance, relevance matrices) are converted by `rpc.convert_vqa`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from vitlens.tensors import TensorFormatError, numpy_to_tensor, tensor_to_numpy
from vitlens.v1 import tensor_pb2, vitlens_pb2
from vitlens_server.domain import (
    ExplainResult,
    ImageInput,
    MetricSummary,
    Predictions,
    Progress,
    TargetSpec,
    TextRelevance,
)
from vitlens_server.domain_detection import DetectionResult
from vitlens_server.errors import InvalidArgument
from vitlens_server.rpc import convert_detection, convert_vqa
from vitlens_server.runtime.api import (
    EvaluateQuery,
    ExplainQuery,
    ExplainReply,
    InlineSample,
    ModelCard,
    PredictQuery,
    PredictReply,
    Timing,
)

__all__ = [
    "evaluate_event",
    "evaluate_query",
    "explain_query",
    "explain_response",
    "model_info",
    "predict_query",
    "predict_response",
]

_OUTPUT_DTYPES = {
    tensor_pb2.DTYPE_UNSPECIFIED: "float32",
    tensor_pb2.DTYPE_FLOAT32: "float32",
    tensor_pb2.DTYPE_FLOAT16: "float16",
}


# ------------------------------------------------------------------------------ requests


def explain_query(request: vitlens_pb2.ExplainRequest, deadline: float | None) -> ExplainQuery:
    options = request.options
    images = _images(request.images)
    return ExplainQuery(
        images=images,
        model=request.model,
        method=request.method,
        method_options=_options(options.method_options, "options.method_options")
        if options.HasField("method_options")
        else {},
        target=_target(request.target, len(request.images)),
        grid=_grid(options.grid),
        return_relevance=options.return_relevance,
        top_k_predictions=options.top_k_predictions,
        output_dtype=_output_dtype(options.output_dtype),
        deadline=deadline,
        texts=tuple(request.texts),
        questions=convert_vqa.questions(request.questions, len(images)),
        regions=convert_vqa.regions(request.regions, len(images)),
        detection=convert_detection.detection_query(request),
    )


def predict_query(request: vitlens_pb2.PredictRequest, deadline: float | None) -> PredictQuery:
    images = _images(request.images)
    return PredictQuery(
        images=images,
        model=request.model,
        top_k=request.top_k,
        deadline=deadline,
        prompts=tuple(request.prompts),
        questions=convert_vqa.questions(request.questions, len(images)),
        regions=convert_vqa.regions(request.regions, len(images)),
        detection_threshold=convert_detection.threshold(request),
    )


def evaluate_query(request: vitlens_pb2.EvaluateRequest) -> EvaluateQuery:
    dataset = request.dataset
    source = dataset.WhichOneof("source")
    return EvaluateQuery(
        methods=tuple(request.methods),
        metrics=tuple(request.metrics),
        model=request.model,
        synthetic=dataset.synthetic if source == "synthetic" else None,
        server_path=dataset.server_path if source == "server_path" else None,
        inline=_inline(dataset.inline) if source == "inline" else None,
        limit=dataset.limit,
        method_options={
            k: _options(v, f"method_options[{k}]") for k, v in request.method_options.items()
        },
        metric_options={
            k: _options(v, f"metric_options[{k}]") for k, v in request.metric_options.items()
        },
        explain_label=request.explain_label,
    )


def _options(struct: struct_pb2.Struct, field: str) -> dict[str, Any]:
    """A Struct of options as plain values (NaN and infinities kept, for the data plane to
    refuse by name; JSON conversion would fail on them)."""
    return {key: _value(value, f"{field}.{key}") for key, value in struct.fields.items()}


def _value(value: struct_pb2.Value, field: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _options(value.struct_value, field)
    if kind == "list_value":
        return [_value(v, field) for v in value.list_value.values]
    if kind is None or kind == "null_value":
        return None
    return getattr(value, kind)


def _images(images: Sequence[tensor_pb2.Image]) -> tuple[ImageInput, ...]:
    return tuple(_image(image, f"images[{i}]") for i, image in enumerate(images))


def _image(image: tensor_pb2.Image, where: str) -> ImageInput:
    source = image.WhichOneof("source")
    if source == "pixels":
        return ImageInput(image.id, pixels=_array(image.pixels, f"{where}.pixels"), where=where)
    encoded = image.encoded if source == "encoded" else None
    return ImageInput(image.id, encoded=encoded, where=where)


def _array(tensor: tensor_pb2.Tensor, where: str) -> np.ndarray:
    try:
        return tensor_to_numpy(tensor, copy=False)  # a view: the decode pool copies
    except TensorFormatError as err:
        raise InvalidArgument(f"{where}: {err}", field=where) from err


def _inline(data: vitlens_pb2.InlineDataset) -> tuple[InlineSample, ...]:
    samples = []
    for i, sample in enumerate(data.samples):
        where = f"dataset.inline.samples[{i}]"
        mask = _array(sample.mask, f"{where}.mask") if sample.HasField("mask") else None
        samples.append(InlineSample(_image(sample.image, f"{where}.image"), sample.label, mask))
    return tuple(samples)


def _target(target: vitlens_pb2.Target, num_images: int) -> TargetSpec:
    kind = target.WhichOneof("selector")
    if kind == "class_index":
        return TargetSpec("index", (target.class_index,))
    if kind == "per_image":
        indices = tuple(target.per_image.indices)
        if len(indices) != num_images:
            raise InvalidArgument(
                f"target.per_image has {len(indices)} class indices for {num_images} images; "
                "give exactly one per image",
                field="target.per_image.indices",
            )
        return TargetSpec("per_image", indices)
    if kind == "top_k":
        return TargetSpec("top_k", k=target.top_k)
    return TargetSpec("predicted")


_GRIDS = {
    vitlens_pb2.OUTPUT_GRID_UNSPECIFIED: "tokens",  # the documented default
    vitlens_pb2.OUTPUT_GRID_TOKENS: "tokens",
    vitlens_pb2.OUTPUT_GRID_INPUT: "input",
}


def _grid(grid: int) -> str:
    if grid not in _GRIDS:
        raise InvalidArgument(
            f"options.grid must be OUTPUT_GRID_TOKENS or OUTPUT_GRID_INPUT; got {grid}",
            field="options.grid",
        )
    return _GRIDS[grid]


def _output_dtype(dtype: int) -> str:
    if dtype not in _OUTPUT_DTYPES:
        name = tensor_pb2.Dtype.Name(dtype) if dtype in tensor_pb2.Dtype.values() else dtype
        raise InvalidArgument(
            f"options.output_dtype must be DTYPE_FLOAT32 or DTYPE_FLOAT16; got {name}",
            field="options.output_dtype",
        )
    return _OUTPUT_DTYPES[dtype]


# ------------------------------------------------------------------------------ replies


def explain_response(reply: ExplainReply) -> vitlens_pb2.ExplainResponse:
    return vitlens_pb2.ExplainResponse(
        model=reply.model,
        method=reply.method,
        results=[
            convert_detection.image_detections(result, image_id, reply.labels)
            if isinstance(result, DetectionResult)
            else _image_explanation(result, image_id, reply.labels)
            for result, image_id in zip(reply.results, reply.ids, strict=True)
        ],
        timing=_timing(reply.timing),
    )


def predict_response(reply: PredictReply) -> vitlens_pb2.PredictResponse:
    return vitlens_pb2.PredictResponse(
        model=reply.model,
        results=[
            vitlens_pb2.Classification(
                id=image_id,
                predictions=_predictions(reply.predictions, row, reply.labels),
                detections=None
                if reply.predictions.detections is None
                else convert_detection.detections(reply.predictions.detections[row], reply.labels),
            )
            for row, image_id in enumerate(reply.ids)
        ],
        timing=_timing(reply.timing),
    )


def _image_explanation(
    result: ExplainResult, image_id: str, labels: Sequence[str]
) -> vitlens_pb2.ImageExplanation:
    """A B = 1 result as the message of its image (on request regions: no heatmap, one
    relevance per region)."""
    on_regions = result.regions is not None
    explanations = [
        vitlens_pb2.Explanation(
            target=_prediction(
                labels,
                result.targets[0, k],
                result.target_probabilities[0, k],
                result.target_logits[0, k],
            ),
            heatmap=None if on_regions else numpy_to_tensor(result.heatmaps[0, k]),
            relevance=None if result.relevance is None else numpy_to_tensor(result.relevance[0, k]),
            text=None if result.texts is None else _text_relevance(result.texts[0][k]),
            region_relevance=convert_vqa.region_relevance(result, k),
            matrices=convert_vqa.matrices(result, k),
        )
        for k in range(result.targets.shape[1])
    ]
    return vitlens_pb2.ImageExplanation(
        id=image_id,
        predictions=_predictions(result.predictions, 0, labels),
        explanations=explanations,
    )


def _text_relevance(text: TextRelevance) -> vitlens_pb2.TextRelevance:
    return vitlens_pb2.TextRelevance(
        text=text.text, tokens=text.tokens, relevance=text.relevance.tolist()
    )


def _prediction(labels: Sequence[str], index: int, probability: float, logit: float):
    return vitlens_pb2.Prediction(
        index=int(index), label=labels[index], probability=float(probability), logit=float(logit)
    )


def _predictions(preds: Predictions, row: int, labels: Sequence[str]) -> list:
    return [
        _prediction(labels, i, p, z)
        for i, p, z in zip(
            preds.indices[row], preds.probabilities[row], preds.logits[row], strict=True
        )
    ]


def _timing(timing: Timing) -> vitlens_pb2.Timing:
    return vitlens_pb2.Timing(
        preprocess_seconds=timing.preprocess_s,
        queue_seconds=timing.queue_s,
        compute_seconds=timing.compute_s,
        total_seconds=timing.total_s,
    )


def model_info(card: ModelCard) -> vitlens_pb2.ModelInfo:
    """GetModel's answer."""
    methods = [
        vitlens_pb2.MethodInfo(
            name=m.name,
            description=m.description,
            passes=m.passes,
            class_specific=m.class_specific,
            relevance_matrix=m.relevance_matrix,
            parameters=[
                vitlens_pb2.MethodParameter(
                    name=p.name,
                    type=p.type,
                    default_json=p.default_json,
                    description=p.description,
                    choices=p.choices,
                )
                for p in m.parameters
            ],
            modalities=m.modalities,
        )
        for m in card.methods
    ]
    return vitlens_pb2.ModelInfo(
        name=card.name,
        architecture=card.architecture,
        input_size=card.input_size,
        mean=card.mean,
        std=card.std,
        patch_size=card.patch_size,
        patch_grid=card.patch_grid,
        num_prefix_tokens=card.num_prefix_tokens,
        num_layers=card.num_layers,
        num_heads=card.num_heads,
        labels=card.labels,
        methods=methods,
        weights=vitlens_pb2.Weights(
            source=card.weights_source,
            random=card.weights_random,
            sha256=card.weights_sha256,
            metadata=dict(card.weights_metadata),
        ),
        device=card.device,
        readout=card.readout,
        task=_TASKS[card.task],
        modalities=[
            vitlens_pb2.Modality(name=m.name, num_tokens=m.num_tokens, description=m.description)
            for m in card.modalities
        ],
        prompt_template=card.prompt_template,
        visual_input=card.visual_input,
        region_feature_dim=card.region_feature_dim,
        stream_architecture=card.stream_architecture,
    )


_TASKS = {
    "classification": vitlens_pb2.TASK_CLASSIFICATION,
    "image_text_similarity": vitlens_pb2.TASK_IMAGE_TEXT_SIMILARITY,
    "visual_question_answering": vitlens_pb2.TASK_VISUAL_QUESTION_ANSWERING,
    "object_detection": vitlens_pb2.TASK_OBJECT_DETECTION,
}


def evaluate_event(event: Progress | MetricSummary) -> vitlens_pb2.EvaluateEvent:
    if isinstance(event, Progress):
        return vitlens_pb2.EvaluateEvent(
            progress=vitlens_pb2.Progress(
                done=event.done,
                total=event.total,
                images_per_second=event.images_per_second,
                eta_seconds=event.eta_seconds,
                stage=event.stage,
            )
        )
    return vitlens_pb2.EvaluateEvent(
        result=vitlens_pb2.MetricResult(
            method=event.method,
            metric=event.metric,
            values=[
                vitlens_pb2.Statistic(
                    name=name,
                    mean=s.mean,
                    std=s.std,
                    ci95_low=s.mean - s.ci95,
                    ci95_high=s.mean + s.ci95,
                    n=s.n,
                )
                for name, s in event.values.items()
            ],
            curves=[
                vitlens_pb2.Curve(name=name, x=x, y=[float(v) for v in y])
                for name, (x, y) in event.curves.items()
            ],
        )
    )
