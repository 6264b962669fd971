"""Hostile and careless requests over raw gRPC stubs: each class of issue #14, several triggers
each, answered with a precise client-error status naming the field, never INTERNAL or UNKNOWN,
never an ERROR traceback in the log; the server keeps serving. (Datasets and paths:
tests/rpc/test_hostile_datasets.py; random requests: tests/rpc/test_fuzz.py.)"""

from __future__ import annotations

import io
import logging

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

import vitlens
from tests.conftest import start_server
from tests.tiny import tiny_loaded
from vitlens.client import build_explain_request
from vitlens.tensors import numpy_to_tensor
from vitlens.v1 import tensor_pb2, vitlens_pb2, vitlens_pb2_grpc
from vitlens_server.config import ServerConfig
from vitlens_server.models import ModelRegistry, load_model
from vitlens_server.models.default import DEMO_MODEL_NAME, demo_spec
from vitlens_server.rpc.security import read_tokens

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def served():
    config = ServerConfig(
        port=0,
        max_images_per_request=8,
        max_queue_images=64,
        max_message_bytes=2_000_000,
        max_inline_samples=16,
        max_inline_bytes=200_000,
        cache_bytes=0,
    )
    registry = ModelRegistry([tiny_loaded(seed=12), load_model(demo_spec())])
    running, stop = start_server(config, registry)
    with grpc.insecure_channel(running.address) as channel:
        yield running, vitlens_pb2_grpc.VitlensServiceStub(channel)
    stop()


@pytest.fixture(autouse=True)
def no_tracebacks(caplog):
    """Whatever a test sends, the server logs no ERROR (a traceback) for it."""
    with caplog.at_level(logging.WARNING):
        yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _png(seed: int = 0, size: int = 32) -> bytes:
    out = io.BytesIO()
    Image.fromarray(_image(seed)[:size, :size]).save(out, "PNG")
    return out.getvalue()


def _struct(values: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _refused(call, code: grpc.StatusCode = INVALID) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if not isinstance(result, vitlens_pb2.ExplainResponse | vitlens_pb2.PredictResponse):
            list(result)  # a stream: read it to its status
    err = caught.value
    assert err.code() == code, (err.code(), err.details())
    assert err.details() and len(err.details()) < 1000
    return err


def _field(err: grpc.RpcError) -> str:
    """The field of the BadRequest detail of a refused call."""
    blob = dict(err.trailing_metadata())["grpc-status-details-bin"]
    for detail in status_pb2.Status.FromString(blob).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    raise AssertionError("no BadRequest detail")


def _still_serving(stub) -> None:
    reply = stub.Explain(build_explain_request(_image(), method="rollout"), timeout=30)
    assert reply.results[0].explanations


def _evaluate(**fields) -> vitlens_pb2.EvaluateRequest:
    """An Evaluate request: generated scenes for the demo model (their 8 classes are its own),
    inline samples for the tiny model."""
    fields.setdefault("methods", ["random"])
    fields.setdefault("metrics", ["segmentation"])
    fields.setdefault("dataset", vitlens_pb2.Dataset(synthetic="synthetic:2"))
    model = "tiny" if fields["dataset"].HasField("inline") else DEMO_MODEL_NAME
    return vitlens_pb2.EvaluateRequest(model=model, **fields)


# 1 ------------------------------------------------------------ non-finite, out-of-range numbers


@pytest.mark.parametrize(
    ("method", "options", "field"),
    [
        ("rollout", {"discard_ratio": float("nan")}, "options.method_options.discard_ratio"),
        ("saliency", {"mode": "smoothgrad", "noise": float("inf")}, "options.method_options.noise"),
        ("saliency", {"seed": 1e300}, "options.method_options.seed"),
        ("saliency", {"samples": -float("inf")}, "options.method_options.samples"),
        ("random", {"seed": 2.0**80}, "options.method_options.seed"),
        ("token_reflection", {"batch_size": 1e12}, "options.method_options.batch_size"),
        ("isaw", {"start_layer": 10**6}, "options.method_options.start_layer"),
        ("rollout", {"start_layer": 3}, "options.method_options"),  # the model has 3 blocks
    ],
)
def test_numbers_in_method_options_are_finite_and_bounded(served, method, options, field) -> None:
    _running, stub = served
    request = build_explain_request(_image(), method=method)
    request.options.method_options.CopyFrom(_struct(options))
    err = _refused(lambda: stub.Explain(request, timeout=30))
    assert _field(err) == field
    _still_serving(stub)


@pytest.mark.parametrize(
    "metric_options",
    [
        {"average_drop": {"keep": float("nan")}},
        {"deletion": {"steps": 1e300}},
        {"perturbation": {"batch_size": float("-inf")}},
        {"insertion": {"steps": 0}},
    ],
)
def test_numbers_in_metric_options_are_finite_and_bounded(served, metric_options) -> None:
    _running, stub = served
    (metric,) = metric_options
    request = _evaluate(metrics=[metric], metric_options={metric: _struct(metric_options[metric])})
    err = _refused(lambda: stub.Evaluate(request, timeout=30))
    assert _field(err).startswith(f"metric_options[{metric}].")


# 2 ------------------------------------------------------------ Evaluate's own inputs


def _inline(samples: list[vitlens_pb2.Sample]) -> vitlens_pb2.Dataset:
    return vitlens_pb2.Dataset(inline=vitlens_pb2.InlineDataset(samples=samples))


def _sample(mask: tensor_pb2.Tensor | None = None, label: int = 1) -> vitlens_pb2.Sample:
    sample = vitlens_pb2.Sample(image=tensor_pb2.Image(encoded=_png()), label=label)
    if mask is not None:
        sample.mask.CopyFrom(mask)
    return sample


@pytest.mark.parametrize(
    ("mask", "field"),
    [
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[32, 32], data=b"\x01" * 7),
         "dataset.inline.samples[0].mask"),  # wrong byte count
        (numpy_to_tensor(np.ones((16, 16), np.uint8)), "dataset.inline.samples[0].mask"),
        (numpy_to_tensor(np.ones((32, 32, 3), np.uint8)), "dataset.inline.samples[0].mask"),
        (tensor_pb2.Tensor(dtype=77, shape=[32, 32]), "dataset.inline.samples[0].mask"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[0, 0]),
         "dataset.inline.samples[0].mask"),  # empty
        (numpy_to_tensor(np.full((32, 32), np.nan, np.float32)), "dataset.inline.samples[0].mask"),
    ],
)  # fmt: skip
def test_inline_masks_of_the_wrong_bytes_shape_or_dtype(served, mask, field) -> None:
    _running, stub = served
    request = _evaluate(dataset=_inline([_sample(mask)]))
    assert _field(_refused(lambda: stub.Evaluate(request, timeout=30))) == field


def test_masks_needed_on_a_dataset_without_them(served) -> None:
    _running, stub = served
    for methods, metrics in ((["oracle"], ["deletion"]), (["random"], ["segmentation"])):
        request = _evaluate(methods=methods, metrics=metrics, dataset=_inline([_sample()]))
        err = _refused(lambda request=request: stub.Evaluate(request, timeout=30))
        assert "mask" in err.details()


def test_inline_samples_name_themselves_not_images(served) -> None:
    _running, stub = served
    bad = vitlens_pb2.Sample(image=tensor_pb2.Image(encoded=b"not an image"), label=0)
    request = _evaluate(dataset=_inline([_sample(), bad]))
    err = _refused(lambda: stub.Evaluate(request, timeout=30))
    assert err.details().startswith("dataset.inline.samples[1].image")
    assert _field(err) == "dataset.inline.samples[1].image.encoded"
    label = _evaluate(dataset=_inline([_sample(label=99)]))
    assert _field(_refused(lambda: stub.Evaluate(label, timeout=30))).endswith(".label")


# 4 ------------------------------------------------------------ bounded inline work


def test_inline_sets_are_bounded_in_count_and_bytes(served) -> None:
    _running, stub = served
    dot = vitlens_pb2.Sample(image=tensor_pb2.Image(encoded=_png(size=1)), label=0)
    many = _evaluate(dataset=_inline([dot] * 1500))  # the server takes 16
    err = _refused(lambda: stub.Evaluate(many, timeout=30))
    assert "at most 16" in err.details() and _field(err) == "dataset.inline.samples"
    heavy = vitlens_pb2.Sample(
        image=tensor_pb2.Image(pixels=numpy_to_tensor(np.zeros((300, 300, 3), np.uint8))), label=0
    )
    err = _refused(lambda: stub.Evaluate(_evaluate(dataset=_inline([heavy] * 3)), timeout=30))
    assert "200,000" in err.details()
    _still_serving(stub)


# 6 ------------------------------------------------------------ token files


def test_token_files_skip_indented_comments_and_refuse_spaces(tmp_path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# operators' tokens\n   # an indented comment\n\n  first  \nsecond\n")
    assert read_tokens(path) == (b"first", b"second")
    path.write_text("# only comments\n    # here\n")
    with pytest.raises(ValueError, match="holds no tokens"):
        read_tokens(path)
    path.write_text("two words\n")
    with pytest.raises(ValueError, match=r"line 1.*whitespace"):
        read_tokens(path)


# 7 ------------------------------------------------------------ huge client strings


@pytest.mark.parametrize("where", ["model", "method", "image id", "option", "metric"])
def test_huge_client_strings_are_not_echoed_whole(served, where) -> None:
    _running, stub = served
    huge = "x" * 100_000
    if where == "metric":
        err = _refused(lambda: stub.Evaluate(_evaluate(metrics=[huge]), timeout=30))
    else:
        request = build_explain_request(_image(), method="rollout")
        if where == "model":
            request.model = huge
        elif where == "method":
            request.method = huge
        elif where == "image id":
            request.images[0].encoded = b"broken"
            request.images[0].id = huge
        else:
            request.options.method_options.CopyFrom(_struct({huge: 1}))
        code = grpc.StatusCode.NOT_FOUND if where == "model" else INVALID
        err = _refused(lambda: stub.Explain(request, timeout=30), code)
    assert "x" * 50 in err.details() and len(err.details()) < 600


# 8 ------------------------------------------------------------ silently accepted nonsense


def test_unknown_enum_values_are_refused(served) -> None:
    _running, stub = served
    grid = build_explain_request(_image(), method="rollout")
    grid.options.grid = 7
    assert _field(_refused(lambda: stub.Explain(grid, timeout=30))) == "options.grid"
    dtype = build_explain_request(_image(), method="rollout")
    dtype.options.output_dtype = 99
    assert _field(_refused(lambda: stub.Explain(dtype, timeout=30))) == "options.output_dtype"
    pixels = build_explain_request(_image(), method="rollout")
    pixels.images[0].pixels.dtype = 42
    assert _field(_refused(lambda: stub.Explain(pixels, timeout=30))) == "images[0].pixels"


def test_options_for_methods_not_requested_and_repeated_names_are_refused(served) -> None:
    _running, stub = served
    stray = _evaluate(method_options={"rollout": _struct({"head_fusion": "max"})})
    assert _field(_refused(lambda: stub.Evaluate(stray, timeout=30))) == "method_options"
    metric = _evaluate(metric_options={"deletion": _struct({"steps": 4})})
    assert _field(_refused(lambda: stub.Evaluate(metric, timeout=30))) == "metric_options"
    repeated = _evaluate(methods=["random"] * 50)
    assert "more than once" in _refused(lambda: stub.Evaluate(repeated, timeout=30)).details()


# 3 ------------------------------------------------------------ admission, whole or not at all


def test_a_request_that_can_never_fit_is_refused_by_its_bound() -> None:
    config = ServerConfig(port=0, max_images_per_request=8, max_queue_images=4, cache_bytes=0)
    running, stop = start_server(config, ModelRegistry([tiny_loaded(seed=13)]))
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = vitlens_pb2_grpc.VitlensServiceStub(channel)
            big = build_explain_request([_image(i) for i in range(6)], method="rollout")
            err = _refused(lambda: stub.Explain(big, timeout=30))  # an idle server
            assert "at most 4" in err.details() and _field(err) == "images"
            assert "retry" not in err.details()
            inline = _evaluate(dataset=_inline([_sample()]))
            err = _refused(
                lambda: stub.Evaluate(inline, timeout=30), grpc.StatusCode.FAILED_PRECONDITION
            )  # Evaluate explains 32 samples per call
            assert "--max-queue-images" in err.details()
            assert running.server.plane.queued_images("tiny") == 0  # nothing was queued
            _still_serving(stub)
    finally:
        stop()


def test_a_metric_batch_the_queue_cannot_hold_is_refused_before_the_run(served) -> None:
    _running, stub = served
    request = _evaluate(
        metrics=["deletion"], metric_options={"deletion": _struct({"batch_size": 1000})}
    )
    err = _refused(lambda: stub.Evaluate(request, timeout=30))
    assert _field(err) == "metric_options[deletion].batch_size" and "at most 64" in err.details()


# 10 ------------------------------------------------------------ no tracebacks for ordinary use


def test_malformed_bytes_and_oversized_answers_are_client_errors(served) -> None:
    running, stub = served
    channel = grpc.insecure_channel(running.address)
    for rpc in ("Explain", "Predict", "Evaluate", "GetModel"):
        call = (channel.unary_stream if rpc == "Evaluate" else channel.unary_unary)(
            f"/vitlens.v1.VitlensService/{rpc}"
        )
        for data in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x12\x03\x08\xff"):
            err = _refused(lambda call=call, data=data: call(data, timeout=30))
            assert "not a valid protobuf message" in err.details()
    channel.close()
    _still_serving(stub)


def test_replies_over_the_message_limit_say_how_to_ask_for_less() -> None:
    config = ServerConfig(port=0, max_message_bytes=20_000, cache_bytes=0)
    running, stop = start_server(config, ModelRegistry([tiny_loaded(seed=14)]))
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = vitlens_pb2_grpc.VitlensServiceStub(channel)
            big = build_explain_request(
                [_image(i) for i in range(4)], method="rollout", grid="input", relevance=True
            )
            err = _refused(
                lambda: stub.Explain(big, timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            assert "message limit of 20,000" in err.details() and "float16" in err.details()
            _still_serving(stub)
    finally:
        stop()


def test_cancelled_and_deadlined_evaluate_calls_log_no_error(served) -> None:
    _running, stub = served
    long_run = _evaluate(
        methods=["generic"], dataset=vitlens_pb2.Dataset(synthetic="synthetic:300")
    )
    call = stub.Evaluate(long_run, timeout=60)
    next(call)  # running
    call.cancel()
    err = _refused(lambda: stub.Evaluate(long_run, timeout=0.5), grpc.StatusCode.DEADLINE_EXCEEDED)
    assert err.details()
    _still_serving(stub)


# structured details reach the SDK's typed exceptions (retry hints: tests/rpc/test_serving.py)


def test_the_sdk_surfaces_field_violations_and_resources(served) -> None:
    running, _stub = served
    with vitlens.Client(running.address, timeout_s=30) as client:
        with pytest.raises(vitlens.InvalidArgumentError) as caught:
            client.explain(_image(), method="rollout", method_options={"discard_ratio": 5})
        (violation,) = caught.value.field_violations
        assert violation.field == "options.method_options.discard_ratio"
        assert "must lie in" in violation.description and caught.value.request_id
        with pytest.raises(vitlens.NotFoundError) as caught:
            client.explain(_image(), model="nope")
        assert caught.value.resource == vitlens.Resource("model", "nope")
