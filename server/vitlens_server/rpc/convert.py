"""Protobuf messages ↔ domain objects."""

from __future__ import annotations

import json
from collections.abc import Iterable

from google.protobuf import json_format

from vitlens.tensors import numpy_to_tensor
from vitlens.v1 import tensor_pb2, vitlens_pb2
from vitlens_server.errors import InvalidArgument
from vitlens_server.explain import ExplainResult, MethodSpec, Predictions, TargetSpec
from vitlens_server.explain.params import describe_params
from vitlens_server.models import LoadedModel

__all__ = [
    "classifications",
    "image_explanations",
    "method_options",
    "model_info",
    "output_dtype",
    "target_spec",
]

_OUTPUT_DTYPES = {
    tensor_pb2.DTYPE_UNSPECIFIED: "float32",
    tensor_pb2.DTYPE_FLOAT32: "float32",
    tensor_pb2.DTYPE_FLOAT16: "float16",
}


def target_spec(target: vitlens_pb2.Target, num_images: int) -> TargetSpec:
    kind = target.WhichOneof("selector")
    if kind == "class_index":
        return TargetSpec("index", (target.class_index,))
    if kind == "per_image":
        indices = tuple(target.per_image.indices)
        if len(indices) != num_images:
            raise InvalidArgument(
                f"target.per_image has {len(indices)} class indices for {num_images} images; "
                "give exactly one per image"
            )
        return TargetSpec("per_image", indices)
    if kind == "top_k":
        return TargetSpec("top_k", k=target.top_k)
    return TargetSpec("predicted")


def output_dtype(dtype: int) -> str:
    if dtype not in _OUTPUT_DTYPES:
        raise InvalidArgument(
            f"options.output_dtype must be DTYPE_FLOAT32 or DTYPE_FLOAT16; got "
            f"{tensor_pb2.DType.Name(dtype) if dtype in tensor_pb2.DType.values() else dtype}"
        )
    return _OUTPUT_DTYPES[dtype]


def method_options(options: vitlens_pb2.ExplainOptions) -> dict:
    if not options.HasField("method_options"):
        return {}
    return json_format.MessageToDict(options.method_options)


def _prediction(model: LoadedModel, index: int, probability: float, logit: float):
    return vitlens_pb2.Prediction(
        index=int(index),
        label=model.labels[index],
        probability=float(probability),
        logit=float(logit),
    )


def _predictions(model: LoadedModel, preds: Predictions, row: int) -> list:
    return [
        _prediction(model, i, p, z)
        for i, p, z in zip(
            preds.indices[row], preds.probabilities[row], preds.logits[row], strict=True
        )
    ]


def classifications(model: LoadedModel, preds: Predictions, ids: list[str]) -> list:
    return [
        vitlens_pb2.Classification(id=image_id, predictions=_predictions(model, preds, row))
        for row, image_id in enumerate(ids)
    ]


def image_explanations(model: LoadedModel, result: ExplainResult, ids: list[str]) -> list:
    out = []
    for row, image_id in enumerate(ids):
        explanations = [
            vitlens_pb2.Explanation(
                target=_prediction(
                    model,
                    result.targets[row, k],
                    result.target_probabilities[row, k],
                    result.target_logits[row, k],
                ),
                heatmap=numpy_to_tensor(result.heatmaps[row, k]),
                relevance=None
                if result.relevance is None
                else numpy_to_tensor(result.relevance[row, k]),
            )
            for k in range(result.targets.shape[1])
        ]
        out.append(
            vitlens_pb2.ImageExplanation(
                id=image_id,
                predictions=_predictions(model, result.predictions, row),
                explanations=explanations,
            )
        )
    return out


def model_info(model: LoadedModel, methods: Iterable[MethodSpec]) -> vitlens_pb2.ModelInfo:
    """GetModel's answer; ``methods`` are those Explain accepts for the model."""
    g = model.geometry
    infos = [
        vitlens_pb2.MethodInfo(
            name=spec.name,
            description=spec.description,
            passes=spec.pass_names,
            class_specific=spec.class_specific,
            relevance_matrix=spec.relevance_matrix,
            parameters=[
                vitlens_pb2.MethodParameter(
                    name=p.name,
                    type=p.type,
                    default_json=p.default_json,
                    description=p.description,
                    choices=p.choices,
                )
                for p in describe_params(spec.params)
            ],
        )
        for spec in methods
    ]
    return vitlens_pb2.ModelInfo(
        name=model.name,
        architecture=model.spec.architecture,
        input_size=g.input_size,
        mean=model.mean,
        std=model.std,
        patch_size=g.patch_size,
        patch_grid=g.grid,
        num_prefix_tokens=g.num_prefix_tokens,
        num_layers=g.num_layers,
        num_heads=g.num_heads,
        labels=model.labels,
        methods=infos,
        weights=vitlens_pb2.Weights(
            source=model.weights.source,
            random=model.weights.random,
            sha256=model.weights.sha256,
            metadata={
                **dict(model.weights.metadata),
                "model_kwargs": json.dumps(dict(model.spec.model_kwargs)),
            },
        ),
        device=str(model.device),
        readout=g.readout,
    )
