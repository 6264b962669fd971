"""ModelInfer requests ↔ the data plane's queries and replies; model metadata.

A vitlens model through the Open Inference Protocol (docs/oip.md):

    input   IMAGE          UINT8 [N, H, W, 3] (0..255), FP32 [N, H, W, 3] (0..1), or
                           BYTES [N] of encoded image files (PNG, JPEG, ...)
    outputs PROBABILITIES  FP32  [N, classes]   softmax over every class
            HEATMAP        FP32  [N, h, w]      token grid, or the model's input size (grid)
            RELEVANCE      FP32  [N, T, T]      token relevance (methods that have one)
            TARGET         INT32 [N]            the explained (or predicted) class

A request explains (`DataPlaneApi.explain`) when it sets any of the parameters ``method``,
``target``, ``grid`` or ``option.<name>``, or asks for HEATMAP or RELEVANCE; otherwise it
classifies (`DataPlaneApi.predict`). Asking for no outputs gets PROBABILITIES, plus HEATMAP
and TARGET when explaining.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitlens_server.domain import ExplainResult, ImageInput, TargetSpec
from vitlens_server.errors import InvalidArgument, clip, cut
from vitlens_server.rpc.oip import grpc_service_pb2 as pb
from vitlens_server.rpc.oip import tensors
from vitlens_server.runtime.api import (
    ExplainQuery,
    ExplainReply,
    ModelCard,
    PredictQuery,
    PredictReply,
)

__all__ = [
    "INPUT",
    "OUTPUTS",
    "PLATFORM",
    "VERSION",
    "Inference",
    "explain_method",
    "explain_query",
    "infer_response",
    "inference",
    "model_metadata",
    "predict_query",
]

INPUT = "IMAGE"
OUTPUTS = ("PROBABILITIES", "HEATMAP", "RELEVANCE", "TARGET")
_EXPLAIN_OUTPUTS = frozenset({"HEATMAP", "RELEVANCE"})
_IMAGE_DATATYPES = ("UINT8", "FP32", "BYTES")
_GRIDS = ("tokens", "input")
OPTION = "option."  # parameters under this prefix are the method's options
_PARAMETERS = ("method", "target", "grid")
PLATFORM = "vitlens"
VERSION = "1"  # the one version of every model


@dataclass(frozen=True)
class Inference:
    """What one ModelInfer request asks for, checked against the protocol."""

    model: str
    images: tuple[ImageInput, ...]
    outputs: tuple[str, ...]  # in the order they are answered
    explain: bool
    method: str = ""
    target: int | None = None  # None: the predicted class
    grid: str = "tokens"
    method_options: Mapping[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ requests


def _explains(request: pb.ModelInferRequest) -> bool:
    named = set(request.parameters)
    return (
        bool(named & set(_PARAMETERS))
        or any(name.startswith(OPTION) for name in named)
        or any(output.name in _EXPLAIN_OUTPUTS for output in request.outputs)
    )


def explain_method(request: pb.ModelInferRequest) -> str | None:
    """The method a request explains with ("" for the default), or None when it classifies.
    Never raises: the interceptor labels metrics with it before the request is checked."""
    if not _explains(request):
        return None
    param = request.parameters.get("method")
    return param.string_param if param is not None else ""


def inference(request: pb.ModelInferRequest) -> Inference:
    explain = _explains(request)
    params = _parameters(request.parameters)
    outputs = _outputs(request.outputs, explain)
    return Inference(
        model=request.model_name,
        images=_images(request),
        outputs=outputs,
        explain=explain,
        method=params.get("method", ""),
        target=params.get("target"),
        grid=params.get("grid", "tokens"),
        method_options=params.get("options", {}),
    )


def _images(request: pb.ModelInferRequest) -> tuple[ImageInput, ...]:
    inputs = request.inputs
    if len(inputs) != 1 or inputs[0].name != INPUT:
        names = ", ".join(clip(t.name, 60) for t in inputs[:5]) or "none"
        raise InvalidArgument(
            f"the request's inputs are {names}; send exactly one input, {INPUT}: UINT8 "
            "[N, H, W, 3], FP32 [N, H, W, 3] in [0, 1], or BYTES [N] of encoded image files",
            field="inputs",
        )
    tensor, where = inputs[0], INPUT
    if tensor.parameters:
        raise InvalidArgument(
            f"{where} takes no parameters (shared memory is not supported); got "
            f"{', '.join(clip(k, 60) for k in sorted(tensor.parameters)[:5])}",
            field=where,
        )
    raw_count = len(request.raw_input_contents)
    if raw_count > 1:
        raise InvalidArgument(
            f"raw_input_contents has {raw_count} entries for 1 input; send one per input",
            field="raw_input_contents",
        )
    _check_image_tensor(tensor, where)
    array = tensors.decode(tensor, request.raw_input_contents[0] if raw_count else None, where)
    if tensor.datatype == "BYTES":
        return tuple(
            ImageInput(encoded=bytes(data), where=f"{where}[{i}]") for i, data in enumerate(array)
        )
    return tuple(ImageInput(pixels=pixels, where=f"{where}[{i}]") for i, pixels in enumerate(array))


def _check_image_tensor(tensor: pb.ModelInferRequest.InferInputTensor, where: str) -> None:
    datatype, shape = tensor.datatype, list(tensor.shape)
    if datatype not in _IMAGE_DATATYPES:
        raise InvalidArgument(
            f"{where} has datatype {clip(datatype, 40)}; send UINT8 pixels (0..255), FP32 "
            "pixels (0..1) or BYTES (encoded image files)",
            field=where,
        )
    tensors.checked_shape(shape, where)
    if datatype == "BYTES":
        if len(shape) != 1:
            raise InvalidArgument(
                f"{where} of BYTES has shape {shape}; send shape [N], one encoded image file "
                "per element",
                field=where,
            )
    elif len(shape) != 4 or shape[3] not in (1, 3):
        raise InvalidArgument(
            f"{where} of {datatype} has shape {shape}; send [N, H, W, 3] (RGB, channels last) "
            "or [N, H, W, 1] (grey)",
            field=where,
        )
    if shape[0] == 0:
        raise InvalidArgument(f"{where} holds no images (shape {shape})", field=where)


def _parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for name in sorted(parameters):
        where = f"parameters[{cut(name, 60)}]"
        kind = parameters[name].WhichOneof("parameter_choice")
        if kind is None:
            raise InvalidArgument(f"{where} has no value; set one of its fields", field=where)
        value = getattr(parameters[name], kind)
        if name.startswith(OPTION) and len(name) > len(OPTION):
            options[name.removeprefix(OPTION)] = value
        elif name == "method":
            out["method"] = _typed(value, kind, "string_param", where)
        elif name == "grid":
            grid = _typed(value, kind, "string_param", where)
            if grid not in _GRIDS:
                raise InvalidArgument(
                    f"{where} must be tokens or input; got {clip(grid)}", field=where
                )
            out["grid"] = grid
        elif name == "target":
            if kind not in ("int64_param", "uint64_param"):
                raise InvalidArgument(
                    f"{where} must be a class index (int64_param); got {kind}",
                    field=where,
                )
            out["target"] = value
        else:
            raise InvalidArgument(
                f"unknown request parameter {clip(name, 60)}; this server takes method, "
                f"target, grid and {OPTION}<name> for the method's options (docs/oip.md)",
                field=where,
            )
    if options:
        out["options"] = options
    return out


def _typed(value: Any, kind: str, wanted: str, where: str) -> Any:
    if kind != wanted:
        raise InvalidArgument(f"{where} must be a {wanted}; got {kind}", field=where)
    return value


def _outputs(
    requested: Sequence[pb.ModelInferRequest.InferRequestedOutputTensor], explain: bool
) -> tuple[str, ...]:
    if not requested:
        return ("PROBABILITIES", "HEATMAP", "TARGET") if explain else ("PROBABILITIES",)
    names: list[str] = []
    for i, output in enumerate(requested):
        where = f"outputs[{i}]"
        if output.name not in OUTPUTS:
            raise InvalidArgument(
                f"unknown output {clip(output.name, 60)}; ask for any of {', '.join(OUTPUTS)}",
                field=where,
            )
        if output.name in names:
            raise InvalidArgument(f"output {output.name} is asked for twice", field=where)
        if output.parameters:
            keys = ", ".join(clip(k, 60) for k in sorted(output.parameters)[:5])
            raise InvalidArgument(
                f"output {output.name} takes no parameters; got {keys} (for the top classes "
                "ask for PROBABILITIES, the full softmax, instead of class_count)",
                field=where,
            )
        names.append(output.name)
    return tuple(names)


def explain_query(inf: Inference, num_classes: int, deadline: float | None) -> ExplainQuery:
    target = TargetSpec() if inf.target is None else TargetSpec("index", (inf.target,))
    return ExplainQuery(
        images=inf.images,
        model=inf.model,
        method=inf.method,
        method_options=dict(inf.method_options),
        target=target,
        grid=inf.grid,
        return_relevance="RELEVANCE" in inf.outputs,
        top_k_predictions=num_classes,  # every class: PROBABILITIES is the whole softmax
        deadline=deadline,
    )


def predict_query(inf: Inference, num_classes: int, deadline: float | None) -> PredictQuery:
    return PredictQuery(images=inf.images, model=inf.model, top_k=num_classes, deadline=deadline)


# ------------------------------------------------------------------------------ replies


def infer_response(
    request: pb.ModelInferRequest,
    inf: Inference,
    reply: ExplainReply | PredictReply,
    num_classes: int,
) -> pb.ModelInferResponse:
    """The requested outputs of ``reply``, as raw contents in the order asked for."""
    arrays = (
        _explained(reply.results, num_classes)
        if isinstance(reply, ExplainReply)
        else _predicted(reply, num_classes)
    )
    response = pb.ModelInferResponse(model_name=reply.model, model_version=VERSION, id=request.id)
    if isinstance(reply, ExplainReply):
        response.parameters["method"].string_param = reply.method
    for name in inf.outputs:
        tensor, raw = tensors.encode(name, arrays[name], "INT32" if name == "TARGET" else "FP32")
        response.outputs.append(tensor)
        response.raw_output_contents.append(raw)
    return response


def _full_softmax(indices: np.ndarray, probabilities: np.ndarray, num_classes: int) -> np.ndarray:
    """(B, k) top-k indices and probabilities (k = every class) → (B, classes) in class order."""
    full = np.zeros((len(indices), num_classes), np.float32)
    np.put_along_axis(full, indices.astype(np.int64), probabilities, axis=1)
    return full


def _explained(results: Sequence[ExplainResult], num_classes: int) -> dict[str, np.ndarray]:
    """One B = 1, K = 1 result per image → batched arrays."""
    probabilities = [
        _full_softmax(r.predictions.indices, r.predictions.probabilities, num_classes)[0]
        for r in results
    ]
    arrays = {
        "PROBABILITIES": np.stack(probabilities),  # (B, classes)
        "HEATMAP": np.stack([r.heatmaps[0, 0] for r in results]),  # (B, h, w)
        "TARGET": np.array([r.targets[0, 0] for r in results]),  # (B,)
    }
    if results[0].relevance is not None:
        arrays["RELEVANCE"] = np.stack([r.relevance[0, 0] for r in results])  # (B, T, T)
    return arrays


def _predicted(reply: PredictReply, num_classes: int) -> dict[str, np.ndarray]:
    p = reply.predictions
    probabilities = _full_softmax(p.indices, p.probabilities, num_classes)  # (B, classes)
    return {"PROBABILITIES": probabilities, "TARGET": probabilities.argmax(axis=1)}


# ------------------------------------------------------------------------------ metadata


def model_metadata(card: ModelCard) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    grid_h, grid_w = card.patch_grid
    tokens = card.num_prefix_tokens + grid_h * grid_w
    return pb.ModelMetadataResponse(
        name=card.name,
        versions=[VERSION],
        platform=PLATFORM,
        inputs=[tensor(name=INPUT, datatype="UINT8", shape=[-1, -1, -1, 3])],
        outputs=[
            tensor(name="PROBABILITIES", datatype="FP32", shape=[-1, len(card.labels)]),
            tensor(name="HEATMAP", datatype="FP32", shape=[-1, grid_h, grid_w]),
            tensor(name="RELEVANCE", datatype="FP32", shape=[-1, tokens, tokens]),
            tensor(name="TARGET", datatype="INT32", shape=[-1]),
        ],
    )
