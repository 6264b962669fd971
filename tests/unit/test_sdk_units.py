"""Unit tests of the SDK (tensors, images, errors, results, overlay, client, CLI).

No vitlens server is started: client tests talk over loopback to a tiny in-process fake
servicer with hand-written answers.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
import types
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

import vitlens
from vitlens import cli, errors
from vitlens.client import build_explain_request, build_target, channel_options
from vitlens.images import to_image, to_images
from vitlens.overlay import colorize, overlay, render_explanation
from vitlens.results import ExplainResult, Explanation, ModelInfo, Prediction
from vitlens.tensors import TensorFormatError, numpy_to_tensor, tensor_to_numpy
from vitlens.v1 import tensor_pb2, vitlens_pb2, vitlens_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])


# ------------------------------------------------------------------------------------ tensors


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 2, 3, 4)])
def test_tensor_round_trip(dtype: type, shape: tuple[int, ...]) -> None:
    a = (np.arange(int(np.prod(shape))) % 200).astype(dtype).reshape(shape)
    t = numpy_to_tensor(a)
    assert tuple(t.shape) == shape
    assert len(t.data) == a.size * a.itemsize
    b = tensor_to_numpy(t)
    assert b.dtype == a.dtype and b.shape == shape
    np.testing.assert_array_equal(a, b)
    assert b.flags.writeable and b.flags.c_contiguous


def test_tensor_wire_layout_is_little_endian_row_major() -> None:
    t = numpy_to_tensor(np.array([[1.0, 2.0]], dtype=">f4"))  # big-endian input
    assert t.dtype == tensor_pb2.DTYPE_FLOAT32
    assert t.data == b"\x00\x00\x80\x3f\x00\x00\x00\x40"
    f = numpy_to_tensor(np.arange(6, dtype=np.uint8).reshape(2, 3).T)  # not C-contiguous
    assert f.data == bytes([0, 3, 1, 4, 2, 5])


def test_tensor_implicit_and_explicit_casts() -> None:
    t = numpy_to_tensor(np.array([0.5, 1.5]))  # float64 -> float32
    assert t.dtype == tensor_pb2.DTYPE_FLOAT32
    np.testing.assert_array_equal(tensor_to_numpy(t), [0.5, 1.5])
    t = numpy_to_tensor(np.array([True, False]))  # bool -> uint8
    assert t.dtype == tensor_pb2.DTYPE_UINT8 and t.data == b"\x01\x00"
    t = numpy_to_tensor(np.array([1, 2], dtype=np.int64), dtype=np.uint8)
    assert t.data == b"\x01\x02"
    t = numpy_to_tensor(3.0, dtype="float16")
    assert tuple(t.shape) == () and tensor_to_numpy(t) == np.float16(3.0)


def test_tensor_view_is_read_only() -> None:
    view = tensor_to_numpy(numpy_to_tensor(np.ones(3, np.float32)), copy=False)
    assert not view.flags.writeable


@pytest.mark.parametrize(
    "a, dtype",
    [
        (np.zeros(2, np.int64), None),
        (np.zeros(2, np.int8), None),
        (np.zeros(2, np.complex64), None),
        (np.array(["a"]), None),
        (np.zeros(2, np.float32), np.int32),
        (np.zeros(2, np.float32), np.float64),
    ],
)
def test_numpy_to_tensor_rejects_unsupported_dtypes(a: np.ndarray, dtype: object) -> None:
    with pytest.raises(TypeError):
        numpy_to_tensor(a, dtype=dtype)


@pytest.mark.parametrize(
    "tensor, message",
    [
        (tensor_pb2.Tensor(shape=[1], data=b"\x00"), "DTYPE_UNSPECIFIED"),
        (tensor_pb2.Tensor(dtype=9, shape=[1], data=b"\x00"), "unknown tensor dtype 9"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[2, -1]), "negative dimension"),
        (
            tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 3], data=bytes(20)),
            "tensor of shape (2, 3) and dtype float32 needs 24 bytes, got 20",
        ),
        (
            tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT16, shape=[2], data=bytes(6)),
            "needs 4 bytes, got 6",
        ),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32), "shape () and dtype float32"),
        (
            tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[2**31 - 1] * 3),
            "needs 9903520300447984150353281023 bytes",  # Python ints: no overflow
        ),
        (
            tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[2**40, 2**40]),
            "has a dimension above 2,147,483,647",
        ),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[1] * 33), "at most 32"),
        (
            tensor_pb2.Tensor(
                dtype=tensor_pb2.DTYPE_UINT8, shape=[0, 2**31 - 1, 2**31 - 1, 2**31 - 1]
            ),
            "cannot be held",  # no elements, yet more than numpy can index
        ),
    ],
)
def test_tensor_format_errors(tensor: tensor_pb2.Tensor, message: str) -> None:
    with pytest.raises(TensorFormatError) as info:
        tensor_to_numpy(tensor)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------- images


def _png(tmp_path: Path, pixels: np.ndarray, name: str = "tri.png") -> Path:
    from PIL import Image

    path = tmp_path / name
    Image.fromarray(pixels).save(path)
    return path


def test_image_from_path(tmp_path: Path) -> None:
    path = _png(tmp_path, np.zeros((4, 5, 3), np.uint8))
    for arg in (path, str(path)):
        img = to_image(arg)
        assert img.WhichOneof("source") == "encoded"
        assert img.encoded == path.read_bytes() and img.id == "tri.png"
    assert to_image(path, id="x").id == "x"
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        to_image(tmp_path / "nope.png")


@pytest.mark.parametrize("raw", [b"\x89PNG", bytearray(b"\x89PNG"), memoryview(b"\x89PNG")])
def test_image_from_bytes(raw: bytes) -> None:
    img = to_image(raw)
    assert img.encoded == b"\x89PNG" and img.id == ""


@pytest.mark.parametrize(
    "a, wire, shape",
    [
        (np.full((4, 5, 3), 7, np.uint8), tensor_pb2.DTYPE_UINT8, (4, 5, 3)),
        (np.full((4, 5), 7, np.uint8), tensor_pb2.DTYPE_UINT8, (4, 5)),
        (np.full((4, 5, 1), 0.5), tensor_pb2.DTYPE_FLOAT32, (4, 5, 1)),
        (np.full((4, 5, 3), 0.5, np.float16), tensor_pb2.DTYPE_FLOAT16, (4, 5, 3)),
        (np.full((4, 5, 4), 9, np.uint8), tensor_pb2.DTYPE_UINT8, (4, 5, 3)),  # alpha dropped
        (np.full((4, 5, 3), 200, np.int64), tensor_pb2.DTYPE_UINT8, (4, 5, 3)),
    ],
)
def test_image_from_array(a: np.ndarray, wire: int, shape: tuple[int, ...]) -> None:
    img = to_image(a)
    assert img.WhichOneof("source") == "pixels" and img.id == ""
    assert img.pixels.dtype == wire and tuple(img.pixels.shape) == shape
    np.testing.assert_allclose(tensor_to_numpy(img.pixels), a[..., : shape[-1]].reshape(shape))


@pytest.mark.parametrize(
    "a, match",
    [
        (np.zeros((3, 8, 8), np.uint8), "channels-first"),
        (np.zeros((2, 4, 4, 3), np.uint8), "list of arrays"),
        (np.zeros((4, 4, 2), np.uint8), "C in 1 or 3"),
        (np.full((4, 4, 3), 255.0), "0..1"),
        (np.full((4, 4), 300, np.int32), "0..255"),
    ],
)
def test_image_array_errors(a: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        to_image(a)


def test_image_from_pil() -> None:
    from PIL import Image

    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    img = to_image(Image.fromarray(pixels))
    assert img.encoded.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(img.encoded)) as decoded:
        np.testing.assert_array_equal(np.asarray(decoded), pixels)
    cmyk = to_image(Image.new("CMYK", (3, 2)))  # PNG cannot store CMYK: converted to RGB
    with Image.open(io.BytesIO(cmyk.encoded)) as decoded:
        assert decoded.mode == "RGB"


def test_image_proto_passes_through_unchanged() -> None:
    original = tensor_pb2.Image(encoded=b"abc", id="keep")
    assert to_image(original) == original
    renamed = to_image(original, id="new")
    assert renamed.id == "new" and original.id == "keep"


def test_to_images_single_versus_many(tmp_path: Path) -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    assert len(to_images(a)) == 1
    assert len(to_images([a, a, a])) == 3
    assert len(to_images(iter([b"x", b"y"]))) == 2
    path = _png(tmp_path, a)
    assert [i.id for i in to_images([path, str(path)])] == ["tri.png", "tri.png"]
    assert [i.id for i in to_images([a, a], ids=["a", "b"])] == ["a", "b"]
    with pytest.raises(ValueError, match="2 ids for 3 images"):
        to_images([a, a, a], ids=["a", "b"])
    with pytest.raises(ValueError, match="no images"):
        to_images([])
    with pytest.raises(TypeError, match="cannot send int"):
        to_images(3)


# ------------------------------------------------------------------------------------- errors


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    "code, cls",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, vitlens.InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, vitlens.NotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, vitlens.FailedPreconditionError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, vitlens.ResourceExhaustedError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, vitlens.DeadlineExceededError),
        (grpc.StatusCode.UNAVAILABLE, vitlens.UnavailableError),
        (grpc.StatusCode.UNIMPLEMENTED, vitlens.UnimplementedError),
        (grpc.StatusCode.PERMISSION_DENIED, vitlens.PermissionDeniedError),
        (grpc.StatusCode.UNAUTHENTICATED, vitlens.UnauthenticatedError),
        (grpc.StatusCode.CANCELLED, vitlens.CancelledError),
        (grpc.StatusCode.INTERNAL, vitlens.InternalError),
        (grpc.StatusCode.ABORTED, vitlens.VitlensError),
    ],
)
def test_error_mapping(code: grpc.StatusCode, cls: type[vitlens.VitlensError]) -> None:
    err = errors.from_rpc_error(FakeRpcError(code, "what went wrong"))
    assert type(err) is cls
    assert err.code == code and err.details == "what went wrong"
    assert str(err) == f"{code.name}: what went wrong"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and back.code == code and back.details == err.details


def test_error_mapping_of_bare_rpc_error() -> None:
    err = errors.from_rpc_error(grpc.RpcError())
    assert type(err) is vitlens.VitlensError and err.code == grpc.StatusCode.UNKNOWN


# ------------------------------------------------------------------------------------ results


def _prediction(
    index: int = 1, label: str = "triangle", p: float = 0.931
) -> vitlens_pb2.Prediction:
    return vitlens_pb2.Prediction(index=index, label=label, probability=p, logit=2.5)


def _explain_response(dtype: type = np.float32) -> vitlens_pb2.ExplainResponse:
    heat = np.array([[1, 3], [5, 9]], dtype=dtype)  # (gh, gw) = (2, 2)
    rel = np.eye(5, dtype=dtype)  # (N, N), N = 1 prefix + 4 patches
    items = [
        vitlens_pb2.ImageExplanation(
            id=f"img{i}",
            predictions=[_prediction(), _prediction(0, "circle", 0.05)],
            explanations=[
                vitlens_pb2.Explanation(
                    target=_prediction(),
                    heatmap=numpy_to_tensor(heat + i),
                    relevance=numpy_to_tensor(rel) if i == 0 else None,
                )
            ],
        )
        for i in range(2)
    ]
    return vitlens_pb2.ExplainResponse(
        model="demo", method="generic", results=items, timing=vitlens_pb2.Timing(total_seconds=0.5)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_explain_result_from_proto(dtype: type) -> None:
    result = ExplainResult.from_proto(_explain_response(dtype))
    assert (result.model, result.method, len(result)) == ("demo", "generic", 2)
    assert [r.id for r in result] == ["img0", "img1"] and result[-1].id == "img1"
    assert [r.id for r in result[:1]] == ["img0"]
    first = result[0]
    assert first.top == Prediction(1, "triangle", pytest.approx(0.931), 2.5)
    assert first.heatmap.dtype == dtype and first.heatmap.shape == (2, 2)
    assert first.explanations[0].relevance.shape == (5, 5)
    assert result[1].explanations[0].relevance is None
    assert result.timing.total_seconds == 0.5


def test_normalized_heatmap() -> None:
    target = Prediction(0, "a", 1.0, 0.0)
    e = Explanation(target, np.array([[1, 3], [5, 9]], np.float16))
    np.testing.assert_allclose(e.normalized(), [[0.0, 0.25], [0.5, 1.0]])
    assert e.normalized().dtype == np.float32
    flat = Explanation(target, np.full((3, 3), 4.2, np.float32)).normalized()
    np.testing.assert_array_equal(flat, np.zeros((3, 3)))


def test_model_info_from_proto() -> None:
    msg = json_format.ParseDict(
        {
            "name": "demo",
            "architecture": "vit_tiny_patch16_224",
            "inputSize": [3, 64, 64],
            "patchSize": [16, 16],
            "patchGrid": [4, 4],
            "numPrefixTokens": 1,
            "labels": ["circle", "triangle"],
            "methods": [
                {
                    "name": "rollout",
                    "passes": ["forward"],
                    "relevanceMatrix": True,
                    "parameters": [{"name": "head_fusion", "type": "str", "defaultJson": '"mean"'}],
                }
            ],
            "weights": {"source": "random", "random": True, "metadata": {"k": "v"}},
        },
        vitlens_pb2.ModelInfo(),
    )
    info = ModelInfo.from_proto(msg)
    assert info.input_size == (3, 64, 64) and info.patch_grid == (4, 4)
    assert info.labels == ("circle", "triangle") and info.num_classes == 2
    assert info.num_tokens == 17 and info.random_weights
    assert info.weights.metadata == {"k": "v"}
    assert info.method("rollout").parameters[0].default == "mean"
    with pytest.raises(KeyError, match="rollout"):
        info.method("nope")


# ------------------------------------------------------------------------------------ overlay


def test_colorize_range_and_monotone_luminance() -> None:
    ramp = np.linspace(0.0, 1.0, 256, dtype=np.float32).reshape(16, 16)
    rgb = colorize(ramp)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    luma = rgb.reshape(-1, 3).astype(np.float64) @ [0.2126, 0.7152, 0.0722]
    assert np.all(np.diff(luma) >= -1.0)  # rounding to uint8 may wobble by < 1
    assert luma[0] < 10 and luma[-1] > 240
    np.testing.assert_array_equal(colorize(np.array([[-1.0, np.nan]])), colorize(np.zeros((1, 2))))


def test_overlay_shape_and_alpha() -> None:
    image = np.full((30, 40, 3), 100, np.uint8)
    heat = np.arange(4, dtype=np.float32).reshape(2, 2)
    out = overlay(image, heat)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay(image, heat, alpha=0.0), image)
    hot = overlay(image, heat, alpha=1.0)
    np.testing.assert_array_equal(hot[0, 0], colorize(np.zeros((1, 1)))[0, 0])  # the minimum
    np.testing.assert_array_equal(hot[-1, -1], colorize(np.ones((1, 1)))[0, 0])  # the maximum


def test_render_explanation_adds_caption_band() -> None:
    e = Explanation(Prediction(1, "triangle", 0.931, 2.5), np.eye(4, dtype=np.float32))
    fig = render_explanation(np.zeros((300, 300, 3), np.uint8), e, "triangle 93.1% · generic")
    assert fig.mode == "RGB" and fig.width == 300 and fig.height > 300
    assert fig.getpixel((1, 1)) == (255, 255, 255)  # the band is white
    small = render_explanation(np.zeros((20, 10), np.uint8), e)
    assert small.width >= 256


# ------------------------------------------------------------------------- request building


def test_build_target() -> None:
    assert build_target(None, None, 2).WhichOneof("selector") == "predicted"
    assert build_target(3, None, 2).class_index == 3
    assert build_target(np.int64(3), None, 2).class_index == 3
    assert list(build_target([4, 5], None, 2).per_image.indices) == [4, 5]
    assert build_target(None, 3, 2).top_k == 3
    with pytest.raises(ValueError, match="either"):
        build_target(1, 2, 2)
    with pytest.raises(ValueError, match="1 targets for 2 images"):
        build_target([1], None, 2)
    with pytest.raises(ValueError, match="at least 1"):
        build_target(None, 0, 2)
    with pytest.raises(TypeError):
        build_target(True, None, 1)


def test_build_explain_request() -> None:
    req = build_explain_request(
        [b"a", b"b"],
        method="rollout",
        grid="input",
        dtype="float16",
        relevance=True,
        method_options={"head_fusion": "max", "discard_ratio": 0.9},
        ids=["x", "y"],
    )
    assert req.method == "rollout" and [i.id for i in req.images] == ["x", "y"]
    assert req.options.grid == vitlens_pb2.OUTPUT_GRID_INPUT
    assert req.options.output_dtype == tensor_pb2.DTYPE_FLOAT16
    assert req.options.return_relevance and req.options.top_k_predictions == 5
    assert dict(req.options.method_options) == {"head_fusion": "max", "discard_ratio": 0.9}
    with pytest.raises(ValueError, match="grid"):
        build_explain_request(b"a", grid="pixels")
    with pytest.raises(ValueError, match="dtype"):
        build_explain_request(b"a", dtype="float64")


def test_dns_targets_balance_round_robin() -> None:
    assert (
        dict(channel_options(1, target="dns:///vitlens-headless:50051"))["grpc.lb_policy_name"]
        == "round_robin"
    )
    assert "grpc.lb_policy_name" not in dict(channel_options(1, target="localhost:50051"))
    overridden = channel_options(1, [("grpc.lb_policy_name", "pick_first")], target="dns:///x:1")
    assert dict(overridden)["grpc.lb_policy_name"] == "pick_first"


def test_channel_options() -> None:
    opts = dict(channel_options(1024, [("grpc.keepalive_time_ms", 5)]))
    assert opts["grpc.max_send_message_length"] == opts["grpc.max_receive_message_length"] == 1024
    assert opts["grpc.keepalive_time_ms"] == 5 and opts["grpc.keepalive_timeout_ms"] == 20_000
    assert opts["grpc.keepalive_permit_without_calls"] == 0


# ------------------------------------------------------------ client against a fake servicer


class FakeVitlens(vitlens_pb2_grpc.VitlensServiceServicer):
    """Answers from hand-written data; model "missing" gives NOT_FOUND."""

    def __init__(self) -> None:
        self.requests: list[object] = []

    def Explain(
        self, request: vitlens_pb2.ExplainRequest, context: grpc.ServicerContext
    ) -> vitlens_pb2.ExplainResponse:
        self.requests.append(request)
        if request.model == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no model 'missing'")
        response = _explain_response()
        del response.results[:]
        dtype = np.float16 if request.options.output_dtype == tensor_pb2.DTYPE_FLOAT16 else None
        for i, img in enumerate(request.images):
            heat = np.array([[0, 1], [2, 3 + i]], dtype=dtype or np.float32)
            response.results.add(
                id=img.id,
                predictions=[_prediction()],
                explanations=[{"target": _prediction(), "heatmap": numpy_to_tensor(heat)}],
            )
        return response

    def Predict(
        self, request: vitlens_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> vitlens_pb2.PredictResponse:
        results = [{"id": img.id, "predictions": [_prediction()]} for img in request.images]
        return vitlens_pb2.PredictResponse(model="demo", results=results)

    def ListModels(
        self, request: object, context: grpc.ServicerContext
    ) -> vitlens_pb2.ListModelsResponse:
        info = vitlens_pb2.ModelInfo(name="demo", architecture="vit_tiny", input_size=[3, 8, 8])
        info.weights.source, info.weights.random = "random", True
        return vitlens_pb2.ListModelsResponse(models=[info], default_model="demo")

    def GetModel(
        self, request: vitlens_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> vitlens_pb2.ModelInfo:
        if request.name not in ("", "demo"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
        return self.ListModels(None, context).models[0]


@pytest.fixture
def fake_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = FakeVitlens()
    vitlens_pb2_grpc.add_VitlensServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_client_calls(fake_server) -> None:
    address, servicer = fake_server
    with vitlens.Client(address, timeout_s=10) as client:
        client.wait_ready(timeout_s=10)
        result = client.explain(
            [np.zeros((8, 8, 3), np.uint8), b"png"], ids=["a", "b"], top_k=2, dtype="float16"
        )
        assert [r.id for r in result] == ["a", "b"]
        assert result[1].heatmap.dtype == np.float16 and result[1].heatmap[1, 1] == 4
        assert servicer.requests[-1].target.top_k == 2
        assert client.predict(b"png", ids=["p"])[0].top.label == "triangle"
        assert [m.name for m in client.models()] == ["demo"] and client.default_model == "demo"
        assert client.model().random_weights
        with pytest.raises(vitlens.NotFoundError, match="no model 'missing'"):
            client.explain(b"png", model="missing")


async def test_async_client_calls(fake_server) -> None:
    address, _ = fake_server
    async with vitlens.AsyncClient(address, timeout_s=10) as client:
        await client.wait_ready(timeout_s=10)
        result = await client.explain(b"png", target=1)
        assert result[0].top.index == 1 and result[0].heatmap.shape == (2, 2)
        assert (await client.predict([b"a", b"b"]))[1].top.label == "triangle"
        assert await client.default_model == "demo"
        with pytest.raises(vitlens.NotFoundError):
            await client.model("other")


def test_wait_ready_times_out() -> None:
    with vitlens.Client(_closed_port()) as client, pytest.raises(vitlens.UnavailableError):
        client.wait_ready(timeout_s=0.5)


# ---------------------------------------------------------------------------------------- CLI


def test_cli_explain_writes_files(fake_server, tmp_path: Path, capsys) -> None:
    address, servicer = fake_server
    image = _png(tmp_path, np.full((32, 48, 3), 128, np.uint8))
    out = tmp_path / "out"
    argv = ["explain", str(image), "--server", address, "--out", str(out)]
    assert cli.main([*argv, "--option", "discard_ratio=0.9", "--option", "head_fusion=max"]) == 0
    options = servicer.requests[-1].options.method_options
    assert dict(options) == {"discard_ratio": 0.9, "head_fusion": "max"}
    assert "triangle 93.1%" in capsys.readouterr().out
    report = json.loads((out / "tri.json").read_text())
    assert report["explanations"][0]["heatmap_shape"] == [2, 2]
    assert report["explanations"][0]["heatmap_max"] == 3.0
    assert (out / "tri.png").is_file()
    assert cli.main([*argv, "--top-k", "2"]) == 0
    assert (out / "tri_triangle.png").is_file()


def test_cli_models_and_predict(fake_server, capsys) -> None:
    address, _ = fake_server
    assert cli.main(["models", "--server", address]) == 0
    table = capsys.readouterr().out
    assert "vit_tiny" in table and "3x8x8" in table and "demo *" in table
    assert cli.main(["models", "--server", address, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["default_model"] == "demo"


def test_cli_errors(fake_server, tmp_path: Path, capsys) -> None:
    address, _ = fake_server
    image = _png(tmp_path, np.zeros((8, 8, 3), np.uint8))
    assert cli.main(["predict", str(image), "--server", _closed_port()]) == 1
    assert "unreachable" in capsys.readouterr().err
    args = ["explain", str(image), "--server", address, "--model", "missing"]
    assert cli.main([*args, "--out", str(tmp_path)]) == 1
    assert "error: NOT_FOUND: no model 'missing'" in capsys.readouterr().err
    assert cli.main(["predict", str(tmp_path / "nope.png"), "--server", address]) == 1


# ------------------------------------------------------------------------------------ imports


def test_sdk_imports_neither_torch_nor_pil() -> None:
    code = (
        "import vitlens, vitlens.cli, vitlens.client, vitlens.overlay, sys; "
        "assert 'torch' not in sys.modules and 'PIL' not in sys.modules, sorted(sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cli_serve_forwards_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 0

    fake = types.ModuleType("vitlens_server.cli")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vitlens_server.cli", fake)
    assert cli.main(["serve", "--port", "0", "--help"]) == 0
    assert seen == [["--port", "0", "--help"]]


def test_cli_serve_without_server_package(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "vitlens_server.cli", None)  # makes the import fail
    assert cli.main(["serve"]) == 2
    assert "pip install vitlens-server" in capsys.readouterr().err


def test_health_status_decoding_matches_the_generated_message() -> None:
    from grpc_health.v1 import health_pb2

    from vitlens.client import health_status

    for status in (0, 1, 2, 3):
        encoded = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        assert health_status(encoded) == status
