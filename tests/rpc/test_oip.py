"""The Open Inference Protocol (KServe v2 / Triton gRPC) over real gRPC on loopback.

Two clients: Triton's own ``tritonclient[grpc]``, which needs protobuf<7 and so runs in its own
venv (build/oip-venv, ``make oip-venv``) as a subprocess — the example a platform engineer
copies, checked against the same request through vitlens.v1 — and the server's own stub
(`vitlens_server.rpc.oip.Stub`) in process, for every class of bad request, readiness and
metrics. The server runs without a result cache, so both protocols compute their answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

import vitlens
from tests.conftest import RunningServer, start_server
from tests.polling import wait_for
from tests.report import report
from tests.rpc.oip_client.messages import (
    INVALID,
    MISTAKES,
    NOT_FOUND,
    contents_request,
    image_request,
    output_arrays,
    png,
)
from tests.tiny import tiny_loaded
from vitlens_server import __version__
from vitlens_server.config import ServerConfig
from vitlens_server.data import render_scene
from vitlens_server.models import ModelRegistry, load_model
from vitlens_server.models.default import DEMO_MODEL_NAME, demo_spec
from vitlens_server.rpc.oip import SERVICE_NAME, Stub
from vitlens_server.rpc.oip import grpc_service_pb2 as pb
from vitlens_server.rpc.server import SERVICE_NAME as VITLENS_SERVICE

ROOT = Path(__file__).resolve().parents[2]
TRITON_PYTHON = ROOT / "build/oip-venv/bin/python"
EXAMPLE = ROOT / "examples/tritonclient/explain.py"
ERRORS_CLIENT = ROOT / "tests/rpc/oip_client/errors.py"
CLASSES = 8  # the demo model's
Input = pb.ModelInferRequest.InferInputTensor


@pytest.fixture(scope="module")
def oip_server() -> Iterator[RunningServer]:
    config = ServerConfig(
        port=0, max_pixels=1_000_000, max_images_per_request=8, max_batch_size=4, cache_bytes=0
    )
    running, stop = start_server(
        config, ModelRegistry([load_model(demo_spec()), tiny_loaded(seed=11)])
    )
    yield running
    stop()


@pytest.fixture(scope="module")
def stub(oip_server: RunningServer) -> Iterator[Stub]:
    with grpc.insecure_channel(oip_server.address) as channel:
        yield Stub(channel)


@pytest.fixture(scope="module")
def v1(oip_server: RunningServer) -> Iterator[vitlens.Client]:
    with vitlens.Client(oip_server.address, timeout_s=60) as client:
        yield client


@pytest.fixture(scope="module")
def triton_python() -> Path:
    if not TRITON_PYTHON.exists():
        message = (
            "build/oip-venv is missing, so the tritonclient tests cannot run: run make oip-venv"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return TRITON_PYTHON


def _scenes(count: int = 8) -> np.ndarray:
    """(count, 224, 224, 3) uint8 demo scenes, several classes among them."""
    return np.stack([render_scene(seed).image for seed in range(count)])


def _full_probabilities(predictions) -> np.ndarray:
    full = np.zeros(CLASSES, np.float32)
    for p in predictions:
        full[p.index] = p.probability
    return full


def _v1_explain(client: vitlens.Client, images, **kwargs) -> dict[str, np.ndarray]:
    result = client.explain(list(images), top_k_predictions=CLASSES, **kwargs)
    arrays = {
        "PROBABILITIES": np.stack([_full_probabilities(r.predictions) for r in result]),
        "HEATMAP": np.stack([r.explanations[0].heatmap for r in result]),
        "TARGET": np.array([r.explanations[0].target.index for r in result]),
    }
    if kwargs.get("relevance"):
        arrays["RELEVANCE"] = np.stack([r.explanations[0].relevance for r in result])
    return arrays


def _assert_same(oip: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    assert set(oip) == set(reference)
    np.testing.assert_array_equal(oip["TARGET"], reference["TARGET"])
    np.testing.assert_array_equal(
        oip["PROBABILITIES"].argmax(axis=1), reference["PROBABILITIES"].argmax(axis=1)
    )
    np.testing.assert_allclose(oip["PROBABILITIES"], reference["PROBABILITIES"], atol=1e-5)
    for name in ("HEATMAP", "RELEVANCE"):
        if name in oip:
            scale = float(np.abs(reference[name]).max())
            np.testing.assert_allclose(oip[name], reference[name], rtol=1e-4, atol=1e-5 * scale)


# ------------------------------------------------------------------ tritonclient (subprocess)


def _run(python: Path, script: Path, *args: str) -> dict:
    run = subprocess.run(
        [str(python), str(script), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.parametrize("datatype", ["UINT8", "FP32", "BYTES"])
def test_tritonclient_example_matches_vitlens_v1(
    datatype: str,
    triton_python: Path,
    oip_server: RunningServer,
    v1: vitlens.Client,
    tmp_path: Path,
) -> None:
    images = _scenes()
    np.save(tmp_path / "images.npy", images)
    summary = _run(
        triton_python, EXAMPLE,
        "--url", oip_server.address, "--model", DEMO_MODEL_NAME, "--datatype", datatype,
        "--images", str(tmp_path / "images.npy"), "--save", str(tmp_path / "out.npz"),
    )  # fmt: skip
    assert summary["model"] == DEMO_MODEL_NAME and summary["method"] == "generic"
    assert summary["id"] == "tritonclient-example"
    assert summary["inputs"] == [{"name": "IMAGE", "datatype": "UINT8"}]
    assert summary["shapes"] == {
        "PROBABILITIES": [8, CLASSES],
        "HEATMAP": [8, 14, 14],
        "TARGET": [8],
    }
    assert summary["targets"] == summary["predicted"]  # no target: the predicted class
    report("tritonclient round trip", f"{datatype} batch of 8, generic: {summary['seconds']} s")

    with np.load(tmp_path / "out.npz") as saved:
        oip = {name: saved[name] for name in saved.files}
    pixels = images.astype(np.float32) / 255 if datatype == "FP32" else images
    sent = [png(p) for p in images] if datatype == "BYTES" else list(pixels)
    reference = _v1_explain(v1, sent, method="generic")
    _assert_same(oip, reference)
    assert summary["predicted"] == reference["PROBABILITIES"].argmax(axis=1).tolist()
    assert len(set(summary["predicted"])) > 1  # the scenes are not all one class


def test_the_readme_command(triton_python: Path, oip_server: RunningServer) -> None:
    """README's "Calling the service → tritonclient": random images, the defaults."""
    summary = _run(triton_python, EXAMPLE, "--url", oip_server.address, "--model", DEMO_MODEL_NAME)
    assert summary["shapes"]["HEATMAP"] == [8, 14, 14] and summary["method"] == "generic"


def test_tritonclient_target_parameter(
    triton_python: Path, oip_server: RunningServer, tmp_path: Path
) -> None:
    summary = _run(
        triton_python, EXAMPLE, "--url", oip_server.address, "--batch", "2", "--target", "5",
        "--method", "rollout",
    )  # fmt: skip
    assert summary["targets"] == [5, 5] and summary["method"] == "rollout"


def test_tritonclient_sees_client_mistakes_as_statuses(
    triton_python: Path, oip_server: RunningServer
) -> None:
    outcomes = _run(triton_python, ERRORS_CLIENT, "--url", oip_server.address)
    not_found = "unknown model 'nope'; this server has: vitlens-demo, tiny"
    for case in ("model_ready_unknown_model", "metadata_unknown_model", "infer_unknown_model"):
        assert outcomes[case] == {"status": "StatusCode.NOT_FOUND", "message": not_found}
    invalid = {k: v for k, v in outcomes.items() if k.startswith("infer_") and "model" not in k}
    assert {v["status"] for k, v in invalid.items() if k != "infer_good"} == {
        "StatusCode.INVALID_ARGUMENT"
    }
    assert "datatype 'INT64'; send UINT8" in outcomes["infer_bad_datatype"]["message"]
    assert "unknown request parameter 'steps'" in outcomes["infer_unknown_parameter"]["message"]
    assert "unknown output 'LOGITS'" in outcomes["infer_unknown_output"]["message"]
    assert "class index 99 is out of range" in outcomes["infer_bad_target"]["message"]
    assert outcomes["infer_good"]["status"] == "OK"


# ------------------------------------------------------------------ health and metadata


def test_server_and_model_metadata(stub: Stub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    server = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert server.name == "vitlens" and server.version == __version__ and not server.extensions
    assert stub.ModelReady(pb.ModelReadyRequest(name=DEMO_MODEL_NAME)).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny", version="1")).ready

    demo = stub.ModelMetadata(pb.ModelMetadataRequest(name=DEMO_MODEL_NAME))
    assert (demo.name, list(demo.versions), demo.platform) == (DEMO_MODEL_NAME, ["1"], "vitlens")
    shapes = {t.name: (t.datatype, list(t.shape)) for t in [*demo.inputs, *demo.outputs]}
    assert shapes == {
        "IMAGE": ("UINT8", [-1, -1, -1, 3]),
        "PROBABILITIES": ("FP32", [-1, CLASSES]),
        "HEATMAP": ("FP32", [-1, 14, 14]),
        "RELEVANCE": ("FP32", [-1, 197, 197]),
        "TARGET": ("INT32", [-1]),
    }
    tiny = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"))
    assert [list(t.shape) for t in tiny.outputs][1:3] == [[-1, 4, 4], [-1, 17, 17]]


def test_ready_follows_the_vitlens_health_status(oip_server: RunningServer, stub: Stub) -> None:
    health = oip_server.server.health

    def set_status(status: int) -> None:
        asyncio.run_coroutine_threadsafe(
            health.set(VITLENS_SERVICE, status), oip_server.loop
        ).result(10)

    set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name=DEMO_MODEL_NAME)).ready
    finally:
        set_status(health_pb2.HealthCheckResponse.SERVING)
    assert stub.ServerReady(pb.ServerReadyRequest()).ready


def test_reflection_lists_the_service(oip_server: RunningServer) -> None:
    """grpcurl and friends find the service and its file by reflection."""
    with grpc.insecure_channel(oip_server.address) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        ]
        services, files = list(reflect.ServerReflectionInfo(iter(requests), timeout=10))
    assert SERVICE_NAME in {s.name for s in services.list_services_response.service}
    (proto,) = files.file_descriptor_response.file_descriptor_proto
    assert b"inference/grpc_service.proto" in proto


# ------------------------------------------------------------------ inference (own stub)


def test_predict_without_parameters_is_the_full_softmax(stub: Stub, v1: vitlens.Client) -> None:
    images = _scenes(3)
    request = image_request(images)
    request.id = "call-7"
    response = stub.ModelInfer(request, timeout=60)
    assert (response.model_name, response.model_version, response.id) == (
        DEMO_MODEL_NAME, "1", "call-7",
    )  # fmt: skip
    assert "method" not in response.parameters  # classified, not explained
    outputs = output_arrays(response)
    assert list(outputs) == ["PROBABILITIES"]
    expected = np.stack(
        [_full_probabilities(c.predictions) for c in v1.predict(list(images), top_k=CLASSES)]
    )
    np.testing.assert_allclose(outputs["PROBABILITIES"], expected, atol=1e-5)
    np.testing.assert_allclose(outputs["PROBABILITIES"].sum(axis=1), 1, atol=1e-5)

    targets = output_arrays(stub.ModelInfer(image_request(images, outputs=("TARGET",)), timeout=60))
    np.testing.assert_array_equal(targets["TARGET"], expected.argmax(axis=1))


def test_explain_outputs_and_options_match_vitlens_v1(stub: Stub, v1: vitlens.Client) -> None:
    images = _scenes(2)
    outputs = ("TARGET", "RELEVANCE", "HEATMAP", "PROBABILITIES")
    request = image_request(images, outputs=outputs, method="rollout", option__head_fusion="max")
    response = stub.ModelInfer(request, timeout=60)
    assert [t.name for t in response.outputs] == list(outputs)  # in the order asked
    assert response.parameters["method"].string_param == "rollout"
    reference = _v1_explain(
        v1, images, method="rollout", relevance=True, method_options={"head_fusion": "max"}
    )
    _assert_same(output_arrays(response), reference)
    default = output_arrays(stub.ModelInfer(image_request(images, method="rollout"), timeout=60))
    assert sorted(default) == ["HEATMAP", "PROBABILITIES", "TARGET"]  # explaining: the default set


def test_grid_and_target_parameters(stub: Stub) -> None:
    images = _scenes(2)
    response = stub.ModelInfer(
        image_request(images, outputs=("HEATMAP", "TARGET"), grid="input", target=6), timeout=60
    )
    outputs = output_arrays(response)
    assert outputs["HEATMAP"].shape == (2, 224, 224)
    assert outputs["TARGET"].tolist() == [6, 6]
    explained = output_arrays(
        stub.ModelInfer(image_request(images, outputs=("HEATMAP",)), timeout=60)
    )
    assert explained["HEATMAP"].shape == (2, 14, 14)  # HEATMAP alone explains (generic)


def test_typed_contents_equal_raw_contents(stub: Stub) -> None:
    images = _scenes(2)
    shape = list(images.shape)
    raw = output_arrays(stub.ModelInfer(image_request(images), timeout=60))["PROBABILITIES"]
    floats = images.astype(np.float32) / 255
    requests = {
        "uint_contents": contents_request("UINT8", shape, uint_contents=images.ravel().tolist()),
        "fp32_contents": contents_request("FP32", shape, fp32_contents=floats.ravel().tolist()),
        "bytes_contents": contents_request("BYTES", [2], bytes_contents=[png(i) for i in images]),
    }
    for name, request in requests.items():
        probabilities = output_arrays(stub.ModelInfer(request, timeout=60))["PROBABILITIES"]
        np.testing.assert_allclose(probabilities, raw, atol=1e-5, err_msg=name)
    # BYTES in raw_input_contents: each element after its 4-byte little-endian length
    files = [png(i) for i in images]
    packed = b"".join(len(f).to_bytes(4, "little") + f for f in files)
    request = pb.ModelInferRequest(
        model_name=DEMO_MODEL_NAME,
        inputs=[Input(name="IMAGE", datatype="BYTES", shape=[2])],
        raw_input_contents=[packed],
    )
    probabilities = output_arrays(stub.ModelInfer(request, timeout=60))["PROBABILITIES"]
    np.testing.assert_allclose(probabilities, raw, atol=1e-5)


# ------------------------------------------------------------------ client mistakes


@pytest.mark.parametrize("case", list(MISTAKES))
def test_client_mistakes_get_precise_statuses(case: str, stub: Stub) -> None:
    request, code, pattern, field = MISTAKES[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=60, metadata=(("x-request-id", f"mistake-{case}"),))
    err = caught.value
    assert err.code() == code, err.details()
    assert re.search(pattern, err.details()), err.details()
    assert ("x-request-id", f"mistake-{case}") in err.trailing_metadata()
    status = rpc_status.from_call(err)
    violations = [
        v.field
        for detail in status.details
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR)
        for v in _unpack(detail).field_violations
    ]
    assert violations == ([] if field is None else [field])


def _unpack(detail) -> error_details_pb2.BadRequest:
    bad = error_details_pb2.BadRequest()
    detail.Unpack(bad)
    return bad


def test_metadata_mistakes_are_not_found(stub: Stub) -> None:
    for call, request in (
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="nope")),
        (stub.ModelReady, pb.ModelReadyRequest(name="nope")),
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="tiny", version="2")),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=10)
        assert caught.value.code() == NOT_FOUND
        assert (
            "vitlens-demo, tiny" in caught.value.details() or "version 1" in caught.value.details()
        )


def test_malformed_request_bytes_are_invalid_argument(oip_server: RunningServer) -> None:
    with grpc.insecure_channel(oip_server.address) as channel:
        call = channel.unary_unary(f"/{SERVICE_NAME}/ModelInfer")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)
    assert caught.value.code() == INVALID
    assert "not a valid protobuf message" in caught.value.details()
    assert "protos/inference" in caught.value.details()


def test_the_server_keeps_serving_after_mistakes(stub: Stub, oip_server: RunningServer) -> None:
    for request, *_ in MISTAKES.values():
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(request, timeout=60)
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    outputs = output_arrays(
        stub.ModelInfer(image_request(_scenes(1), method="generic"), timeout=60)
    )
    assert outputs["HEATMAP"].shape == (1, 14, 14)


# ------------------------------------------------------------------ metrics


def test_calls_are_counted_with_their_own_labels(stub: Stub, oip_server: RunningServer) -> None:
    sample = oip_server.server.telemetry.registry.get_sample_value

    def count(rpc: str, method: str, code: str) -> float:
        return sample("vitlens_requests_total", {"rpc": rpc, "method": method, "code": code}) or 0

    infer = "inference.ModelInfer"
    before = {
        "explain": count(infer, "rollout", "OK"),
        "predict": count(infer, "", "OK"),
        "default": count(infer, "generic", "OK"),
        "unknown": count(infer, "unknown", "INVALID_ARGUMENT"),
        "not_found": count(infer, "", "NOT_FOUND"),
        "metadata": count("inference.ModelMetadata", "", "OK"),
        "latency": sample("vitlens_request_seconds_count", {"rpc": infer, "method": "rollout"})
        or 0,
    }
    stub.ModelInfer(image_request(method="rollout"), timeout=60)
    stub.ModelInfer(image_request(), timeout=60)
    stub.ModelInfer(image_request(outputs=("HEATMAP",)), timeout=60)
    stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=10)
    for request in (image_request(method="no-such-method"), image_request(model="nope")):
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(request, timeout=60)
    # counted as the handler ends, maybe after the answer
    wait_for(lambda: count(infer, "", "NOT_FOUND") == before["not_found"] + 1, 10)
    assert count(infer, "rollout", "OK") == before["explain"] + 1
    assert count(infer, "", "OK") == before["predict"] + 1
    assert count(infer, "generic", "OK") == before["default"] + 1
    assert count(infer, "unknown", "INVALID_ARGUMENT") == before["unknown"] + 1  # bounded label
    assert count("inference.ModelMetadata", "", "OK") == before["metadata"] + 1
    latency = sample("vitlens_request_seconds_count", {"rpc": infer, "method": "rollout"})
    assert latency == before["latency"] + 1
    wait_for(lambda: sample("vitlens_in_flight_requests", {"rpc": infer}) == 0, 10)


# ------------------------------------------------------------------ authentication


def test_bearer_tokens_guard_the_protocol_too() -> None:
    running, stop = start_server(
        ServerConfig(port=0, auth_tokens=(b"oip-secret",)), ModelRegistry([tiny_loaded(seed=9)])
    )
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = Stub(channel)
            for call, request in (
                (stub.ServerReady, pb.ServerReadyRequest()),
                (stub.ModelInfer, image_request(model="tiny")),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    call(request, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            token = (("authorization", "Bearer oip-secret"),)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10, metadata=token).ready
            reply = stub.ModelInfer(image_request(model="tiny"), timeout=30, metadata=token)
            assert output_arrays(reply)["PROBABILITIES"].shape == (1, 5)
    finally:
        stop()


def test_answers_over_the_message_limit_say_how_to_ask_for_less() -> None:
    running, stop = start_server(
        ServerConfig(port=0, max_message_bytes=8192), ModelRegistry([tiny_loaded(seed=9)])
    )
    try:
        images = np.zeros((8, 8, 8, 3), np.uint8)  # 1.5 kB in, 8 x 17 x 17 x 4 B relevance out
        with grpc.insecure_channel(running.address) as channel:
            stub = Stub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(
                    image_request(images, model="tiny", outputs=("RELEVANCE",), method="rollout"),
                    timeout=30,
                )
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "ask for fewer outputs (RELEVANCE is the largest)" in caught.value.details()
            small = image_request(images, model="tiny", outputs=("TARGET",), method="rollout")
            assert output_arrays(stub.ModelInfer(small, timeout=30))["TARGET"].shape == (8,)
    finally:
        stop()
