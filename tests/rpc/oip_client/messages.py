"""ModelInfer requests for tests/rpc/test_oip.py, built with the server's own messages: good
ones, and one per class of client mistake with the status, message and field it must get."""

from __future__ import annotations

import io
from collections.abc import Callable

import grpc
import numpy as np
from PIL import Image

from vitlens_server.models.default import DEMO_MODEL_NAME
from vitlens_server.rpc.oip import grpc_service_pb2 as pb

__all__ = [
    "INVALID",
    "MISTAKES",
    "NOT_FOUND",
    "contents_request",
    "image_request",
    "output_arrays",
    "png",
    "raw_request",
]

Input = pb.ModelInferRequest.InferInputTensor


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_request(
    pixels: np.ndarray | None = None,
    *,
    outputs: tuple[str, ...] = (),
    model: str = DEMO_MODEL_NAME,
    **params: object,
) -> pb.ModelInferRequest:
    """A ModelInfer request of UINT8 ``pixels`` in raw_input_contents."""
    pixels = np.zeros((1, 32, 32, 3), np.uint8) if pixels is None else pixels
    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[Input(name="IMAGE", datatype="UINT8", shape=list(pixels.shape))],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
        raw_input_contents=[pixels.tobytes()],
    )
    for name, value in params.items():
        _set(request.parameters[name.replace("__", ".")], value)
    return request


def _set(param: pb.InferParameter, value: object) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def output_arrays(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": "<f4", "INT32": "<i4"}
    return {
        t.name: np.frombuffer(raw, dtypes[t.datatype]).reshape(tuple(t.shape))
        for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def contents_request(datatype: str, shape: list[int], **contents) -> pb.ModelInferRequest:
    tensor = Input(
        name="IMAGE", datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents)
    )
    return pb.ModelInferRequest(model_name=DEMO_MODEL_NAME, inputs=[tensor])


def raw_request(datatype: str, shape: list[int], data: bytes, **fields) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=DEMO_MODEL_NAME,
        inputs=[Input(name="IMAGE", datatype=datatype, shape=shape, **fields)],
        raw_input_contents=[data],
    )


def _with(request: pb.ModelInferRequest, change: Callable[[pb.ModelInferRequest], object]):
    change(request)
    return request


PIXELS = np.zeros((1, 32, 32, 3), np.uint8)
PNG = png(PIXELS[0])
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

# (request, status, message pattern, field of the BadRequest detail or None)
MISTAKES = {
    "no inputs": (
        pb.ModelInferRequest(model_name=DEMO_MODEL_NAME),
        INVALID,
        r"inputs are none; send exactly one input, IMAGE",
        "inputs",
    ),
    "two inputs": (
        _with(image_request(), lambda r: r.inputs.append(r.inputs[0])),
        INVALID,
        r"inputs are 'IMAGE', 'IMAGE'; send exactly one",
        "inputs",
    ),
    "wrong input name": (
        _with(image_request(), lambda r: setattr(r.inputs[0], "name", "PIXELS")),
        INVALID,
        r"inputs are 'PIXELS'",
        "inputs",
    ),
    "datatype": (
        raw_request("INT64", [1, 32, 32, 3], PIXELS.astype(np.int64).tobytes()),
        INVALID,
        r"IMAGE has datatype 'INT64'; send UINT8 pixels",
        "IMAGE",
    ),
    "byte count": (
        raw_request("UINT8", [1, 32, 32, 3], b"\0" * 10),
        INVALID,
        r"3,072 elements of 1 bytes = 3,072 bytes, but its raw_input_contents entry holds 10",
        "IMAGE",
    ),
    "FP32 byte count": (
        raw_request("FP32", [1, 32, 32, 3], PIXELS.tobytes()),
        INVALID,
        r"3,072 elements of 4 bytes = 12,288 bytes, but .* holds 3,072 bytes",
        "IMAGE",
    ),
    "raw and contents": (
        raw_request(
            "UINT8",
            [1, 1, 1, 3],
            b"\0\0\0",
            contents=pb.InferTensorContents(uint_contents=[0, 0, 0]),
        ),
        INVALID,
        r"sends its elements twice",
        "IMAGE",
    ),
    "two raw entries": (
        _with(image_request(), lambda r: r.raw_input_contents.append(b"")),
        INVALID,
        r"raw_input_contents has 2 entries for 1 input",
        "raw_input_contents",
    ),
    "contents field": (
        contents_request("FP32", [1, 1, 1, 3], uint_contents=[0, 0, 0]),
        INVALID,
        r"FP32, whose elements go in contents.fp32_contents .*fills contents.uint_contents",
        "IMAGE",
    ),
    "contents count": (
        contents_request("UINT8", [1, 2, 2, 3], uint_contents=[0] * 5),
        INVALID,
        r"shape \[1, 2, 2, 3\] \(12 elements\) but contents.uint_contents holds 5",
        "IMAGE",
    ),
    "uint8 range": (
        contents_request("UINT8", [1, 1, 1, 3], uint_contents=[0, 300, 0]),
        INVALID,
        r"UINT8 elements must lie in \[0, 255\]; .* \[0, 300\]",
        "IMAGE",
    ),
    "rank": (
        raw_request("UINT8", [1, 32, 96], PIXELS.tobytes()),
        INVALID,
        r"UINT8 has shape \[1, 32, 96\]; send \[N, H, W, 3\]",
        "IMAGE",
    ),
    "channels": (
        raw_request("UINT8", [1, 32, 24, 4], PIXELS.tobytes()),
        INVALID,
        r"send \[N, H, W, 3\]",
        "IMAGE",
    ),
    "BYTES rank": (
        contents_request("BYTES", [1, 1], bytes_contents=[PNG]),
        INVALID,
        r"BYTES has shape \[1, 1\]; send shape \[N\]",
        "IMAGE",
    ),
    "no images": (
        raw_request("UINT8", [0, 32, 32, 3], b""),
        INVALID,
        r"IMAGE holds no images",
        "IMAGE",
    ),
    "negative dimension": (
        raw_request("UINT8", [1, -32, 32, 3], b""),
        INVALID,
        r"every dimension must lie in \[0, 2147483647\]",
        "IMAGE",
    ),
    "huge dimension": (
        raw_request("UINT8", [1, 2**40, 0, 3], b""),
        INVALID,
        r"every dimension must lie in",
        "IMAGE",
    ),
    "empty image": (
        raw_request("UINT8", [1, 0, 32, 3], b""),
        INVALID,
        r"IMAGE\[0\]\.pixels is empty",
        "IMAGE[0]",
    ),
    "BYTES length prefix cut": (
        raw_request("BYTES", [1], b"\x05\0"),
        INVALID,
        r"cut short in its 4-byte length prefix",
        "IMAGE",
    ),
    "BYTES length overrun": (
        raw_request("BYTES", [1], (100).to_bytes(4, "little") + b"abc"),
        INVALID,
        r"declares 100 bytes but only 3 follow",
        "IMAGE",
    ),
    "BYTES element count": (
        raw_request("BYTES", [2], (3).to_bytes(4, "little") + b"abc"),
        INVALID,
        r"shape \[2\] \(2 elements\) but .* holds 1 BYTES elements",
        "IMAGE",
    ),
    "BYTES not an image": (
        contents_request("BYTES", [1], bytes_contents=[b"not a png"]),
        INVALID,
        r"IMAGE\[0\]: the 9 `encoded` bytes are not an image format",
        "IMAGE[0]",
    ),
    "FP32 range": (
        contents_request("FP32", [1, 1, 1, 3], fp32_contents=[0, 2, 0]),
        INVALID,
        r"float pixels must lie in \[0, 1\]",
        "IMAGE[0]",
    ),
    "FP32 NaN": (
        contents_request("FP32", [1, 1, 1, 3], fp32_contents=[0, float("nan"), 0]),
        INVALID,
        r"NaN or infinite",
        "IMAGE[0]",
    ),
    "input parameter": (
        _with(
            image_request(),
            lambda r: setattr(
                r.inputs[0].parameters["shared_memory_region"], "string_param", "region0"
            ),
        ),
        INVALID,
        r"IMAGE takes no parameters \(shared memory is not supported\)",
        "IMAGE",
    ),
    "unknown parameter": (
        image_request(steps=3),
        INVALID,
        r"unknown request parameter 'steps'; this server takes",
        "parameters[steps]",
    ),
    "parameter without value": (
        _with(image_request(), lambda r: r.parameters["method"]),
        INVALID,
        r"parameters\[method\] has no value",
        "parameters[method]",
    ),
    "method type": (
        image_request(method=3),
        INVALID,
        r"parameters\[method\] must be a string_param; got int64_param",
        "parameters[method]",
    ),
    "target type": (
        image_request(target="cat"),
        INVALID,
        r"parameters\[target\] must be a class index",
        "parameters[target]",
    ),
    "grid": (
        image_request(grid="native"),
        INVALID,
        r"parameters\[grid\] must be tokens or input",
        "parameters[grid]",
    ),
    "unknown method": (
        image_request(method="nope"),
        INVALID,
        r"unknown method 'nope'",
        "parameters[method]",
    ),
    "unknown option": (
        image_request(method="rollout", option__steps=3),
        INVALID,
        r"method 'rollout' has no option 'steps'; valid: ",
        "parameters",
    ),
    "option value": (
        image_request(method="rollout", option__head_fusion="median"),
        INVALID,
        r"rollout.head_fusion must be one of",
        "parameters[option.head_fusion]",
    ),
    "target range": (
        image_request(target=99),
        INVALID,
        r"class index 99 is out of range; .* 8 classes",
        "parameters[target]",
    ),
    "unknown output": (
        image_request(outputs=("LOGITS",)),
        INVALID,
        r"unknown output 'LOGITS'; ask for any of",
        "outputs[0]",
    ),
    "output twice": (
        image_request(outputs=("TARGET", "TARGET")),
        INVALID,
        r"output TARGET is asked for twice",
        "outputs[1]",
    ),
    "output parameter": (
        _with(
            image_request(outputs=("PROBABILITIES",)),
            lambda r: setattr(r.outputs[0].parameters["classification"], "int64_param", 3),
        ),
        INVALID,
        r"output PROBABILITIES takes no parameters; got 'classification'",
        "outputs[0]",
    ),
    "relevance without matrix": (
        image_request(outputs=("RELEVANCE",), method="gradcam"),
        INVALID,
        r"method 'gradcam' has no token relevance matrix.*use one of: .*rollout",
        "outputs",
    ),
    "too many images": (
        image_request(np.zeros((9, 8, 8, 3), np.uint8)),
        INVALID,
        r"has 9 images; .* at most 8",
        "inputs",
    ),
    "unknown model": (
        image_request(model="nope"),
        NOT_FOUND,
        r"unknown model 'nope'; this server has: vitlens-demo, tiny",
        None,
    ),
    "unknown version": (
        _with(image_request(), lambda r: setattr(r, "model_version", "7")),
        NOT_FOUND,
        r"model 'vitlens-demo' has no version '7'; it has version 1",
        None,
    ),
}
