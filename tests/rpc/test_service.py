"""Every RPC and every bad input, through the SDK over real gRPC on loopback."""

from __future__ import annotations

import io
import re

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

import vitlens
from vitlens.v1 import tensor_pb2, vitlens_pb2
from vitlens_server.explain import METHODS
from vitlens_server.models import load_model
from vitlens_server.models.default import DEMO_LABELS, DEMO_MODEL_NAME, demo_spec


def _png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _pixels(seed: int = 0, shape=(40, 50, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ------------------------------------------------------------------------------------ models


def test_list_and_get_models(client: vitlens.Client) -> None:
    models = {m.name: m for m in client.models()}
    assert set(models) == {DEMO_MODEL_NAME, "tiny"}
    assert client.default_model == DEMO_MODEL_NAME
    demo = client.model()
    assert demo.name == DEMO_MODEL_NAME and demo.labels == DEMO_LABELS
    assert demo.input_size == (3, 224, 224) and demo.patch_grid == (14, 14)
    assert demo.num_prefix_tokens == 1 and demo.num_layers == 6 and demo.num_heads == 3
    assert demo.readout == "token"
    expected = load_model(demo_spec()).weights
    assert demo.random_weights == expected.random and demo.weights.source == expected.source
    assert {"raw_attention", "rollout", "generic"} <= set(demo.method_names)
    rollout = demo.method("rollout")
    assert rollout.relevance_matrix and not rollout.class_specific
    assert {p.name for p in rollout.parameters} == {"head_fusion", "discard_ratio", "start_layer"}
    assert demo.method("generic").passes == ("forward", "backward")
    assert client.model("tiny").patch_grid == (4, 4)


def test_unknown_model_is_not_found(client: vitlens.Client) -> None:
    with pytest.raises(vitlens.NotFoundError, match=r"unknown model 'nope'.*vitlens-demo, tiny"):
        client.model("nope")
    with pytest.raises(vitlens.NotFoundError):
        client.explain(_png(), model="nope")
    with pytest.raises(vitlens.NotFoundError):
        client.predict(_png(), model="nope")


# ----------------------------------------------------------------------------------- explain


def _model_state(server) -> dict:
    """What an explanation must leave as it found it: hooks, attention paths, weights, grads."""
    module = server.server.registry.get(DEMO_MODEL_NAME).module
    return {
        "hooks": [
            (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in module.named_modules()
        ],
        "fused_attn": [block.attn.fused_attn for block in module.blocks],
        "grads": [name for name, p in module.named_parameters() if p.grad is not None],
        "requires_grad": [name for name, p in module.named_parameters() if p.requires_grad],
        "weights": {k: v.clone() for k, v in module.state_dict().items()},
        "training": module.training,
    }


@pytest.mark.parametrize("method", list(METHODS))
def test_explain_each_method(server, client: vitlens.Client, method: str) -> None:
    before = _model_state(server)
    if METHODS.get(method).needs_mask:
        with pytest.raises(vitlens.InvalidArgumentError, match="Evaluate"):
            client.explain(_png(seed=1), method=method)
        return
    result = client.explain([_png(seed=1), _pixels(2)], method=method, ids=["a", "b"])
    after = _model_state(server)
    weights = after.pop("weights")
    assert all(v.equal(weights[k]) for k, v in before.pop("weights").items())
    assert after == before and not after["grads"]
    assert result.model == DEMO_MODEL_NAME and result.method == method
    assert [r.id for r in result] == ["a", "b"]
    for image in result:
        assert len(image.predictions) == 5
        probabilities = [p.probability for p in image.predictions]
        assert probabilities == sorted(probabilities, reverse=True)
        assert image.predictions[0].label in DEMO_LABELS
        (explanation,) = image.explanations
        assert explanation.target.index == image.top.index
        assert explanation.heatmap.shape == (14, 14) and explanation.heatmap.dtype == np.float32
        assert np.isfinite(explanation.heatmap).all() and explanation.relevance is None
    assert result.timing.total_seconds >= result.timing.compute_seconds > 0


def test_explain_options(client: vitlens.Client) -> None:
    result = client.explain(
        _png(),
        method="rollout",
        grid="input",
        relevance=True,
        dtype="float16",
        top_k_predictions=3,
        method_options={"head_fusion": "max", "discard_ratio": 0.5},
    )
    (image,) = result
    assert len(image.predictions) == 3
    explanation = image.explanations[0]
    assert explanation.heatmap.shape == (224, 224) and explanation.heatmap.dtype == np.float16
    assert explanation.relevance.shape == (197, 197)
    np.testing.assert_allclose(explanation.relevance.astype(np.float32).sum(-1), 1, atol=1e-2)


@pytest.mark.parametrize(
    "grid", [vitlens_pb2.OUTPUT_GRID_UNSPECIFIED, vitlens_pb2.OUTPUT_GRID_TOKENS]
)
def test_an_unset_grid_means_the_token_grid(client: vitlens.Client, grid: int) -> None:
    request = vitlens_pb2.ExplainRequest(method="raw_attention", options={"grid": grid})
    request.images.add(encoded=_png())
    (image,) = client.stub.Explain(request, timeout=30).results
    assert list(image.explanations[0].heatmap.shape) == [14, 14]


def test_explain_targets(client: vitlens.Client) -> None:
    images = [_png(seed=3), _png(seed=4)]
    fixed = client.explain(images, target=6)
    assert [r.explanations[0].target.index for r in fixed] == [6, 6]
    assert fixed[0].explanations[0].target.label == DEMO_LABELS[6]
    per_image = client.explain(images, target=[1, 7])
    assert [r.explanations[0].target.index for r in per_image] == [1, 7]
    top = client.explain(images, top_k=3)
    for image in top:
        assert [e.target.index for e in image.explanations] == [
            p.index for p in image.predictions[:3]
        ]
        assert not np.allclose(image.explanations[0].heatmap, image.explanations[1].heatmap)


def test_explain_on_a_second_model_and_batches_larger_than_a_pass(client) -> None:
    images = [_pixels(seed, (32, 32, 3)) for seed in range(7)]  # max_batch_size is 4
    batched = client.explain(images, model="tiny", relevance=True)
    assert len(batched) == 7 and batched[0].heatmap.shape == (4, 4)
    single = client.explain(images[5], model="tiny", relevance=True)
    np.testing.assert_allclose(single[0].heatmap, batched[5].heatmap, rtol=1e-4, atol=1e-6)


def test_input_kinds_agree(client: vitlens.Client) -> None:
    """The same pixels as PNG bytes, a uint8 tensor and a float tensor explain alike."""
    pixels = _pixels(5, (224, 224, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    results = client.explain([buffer.getvalue(), pixels, pixels.astype(np.float32) / 255])
    for other in results[1:]:
        np.testing.assert_allclose(other.heatmap, results[0].heatmap, rtol=1e-4, atol=1e-6)


def test_grayscale_equals_rgb_with_equal_channels(client: vitlens.Client) -> None:
    gray = _pixels(9, (60, 70))
    results = client.explain([gray, np.repeat(gray[:, :, None], 3, axis=2)], method="rollout")
    np.testing.assert_array_equal(results[0].heatmap, results[1].heatmap)


# ----------------------------------------------------------------------------------- predict


def test_predict(client: vitlens.Client) -> None:
    images = [_png(seed=6), _pixels(7)]
    classified = client.predict(images, top_k=2, ids=["x", "y"])
    assert [c.id for c in classified] == ["x", "y"]
    assert all(len(c.predictions) == 2 for c in classified)
    explained = client.explain(images, method="raw_attention")
    for c, e in zip(classified, explained, strict=True):
        assert c.predictions[0].index == e.top.index
        assert c.predictions[0].probability == pytest.approx(e.top.probability, rel=1e-4)


# ------------------------------------------------------------------------- health, reflection


def test_health_and_reflection(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "vitlens.v1.VitlensService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
        names = {s.name for s in reply.list_services_response.service}
        assert {"vitlens.v1.VitlensService", "grpc.health.v1.Health"} <= names


# --------------------------------------------------------------------------------- bad input


def _raw(request: vitlens_pb2.ExplainRequest, client: vitlens.Client) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.Explain(request, timeout=30)
    return caught.value


def _tensor(array: np.ndarray, dtype=tensor_pb2.DTYPE_UINT8, shape=None) -> tensor_pb2.Image:
    return tensor_pb2.Image(
        pixels=tensor_pb2.Tensor(dtype=dtype, shape=shape or array.shape, data=array.tobytes())
    )


BAD_REQUESTS = {
    "undecodable bytes": (
        vitlens_pb2.ExplainRequest(
            images=[tensor_pb2.Image(encoded=_png()), tensor_pb2.Image(encoded=b"not an image")]
        ),
        r"images\[1\]: the 12 `encoded` bytes are not an image format",
    ),
    "truncated png": (
        vitlens_pb2.ExplainRequest(images=[tensor_pb2.Image(encoded=_png()[:200])]),
        r"images\[0\]: the image is corrupt or truncated",
    ),
    "empty image": (
        vitlens_pb2.ExplainRequest(images=[tensor_pb2.Image(id="e")]),
        r"images\[0\] \('e'\) is empty",
    ),
    "byte length mismatch": (
        vitlens_pb2.ExplainRequest(images=[_tensor(_pixels(0, (10, 10, 3)), shape=[10, 10, 4])]),
        r"needs 400 bytes, got 300",
    ),
    "wrong rank": (
        vitlens_pb2.ExplainRequest(images=[_tensor(_pixels(0, (2, 10, 10, 3)))]),
        r"shape \(2, 10, 10, 3\); expected \(H, W\), \(H, W, 1\) or \(H, W, 3\)",
    ),
    "wrong channels": (
        vitlens_pb2.ExplainRequest(images=[_tensor(_pixels(0, (10, 10, 4)))]),
        r"shape \(10, 10, 4\)",
    ),
    "float pixels out of range": (
        vitlens_pb2.ExplainRequest(
            images=[_tensor(np.full((8, 8, 3), 2.0, np.float32), tensor_pb2.DTYPE_FLOAT32)]
        ),
        r"float pixels must lie in \[0, 1\]",
    ),
    "unspecified dtype": (
        vitlens_pb2.ExplainRequest(
            images=[_tensor(_pixels(0, (4, 4, 3)), tensor_pb2.DTYPE_UNSPECIFIED)]
        ),
        r"images\[0\]\.pixels:",
    ),
    "unknown method": (
        vitlens_pb2.ExplainRequest(method="gradcam++", images=[tensor_pb2.Image(encoded=_png())]),
        re.escape(f"unknown method 'gradcam++'; valid methods: {', '.join(METHODS)}"),
    ),
    "unknown method option": (
        vitlens_pb2.ExplainRequest(
            method="rollout",
            images=[tensor_pb2.Image(encoded=_png())],
            options=vitlens_pb2.ExplainOptions(method_options={"fusion": "max"}),
        ),
        r"method 'rollout' has no option 'fusion'",
    ),
    "class index out of range": (
        vitlens_pb2.ExplainRequest(
            images=[tensor_pb2.Image(encoded=_png())], target=vitlens_pb2.Target(class_index=8)
        ),
        r"class index 8 is out of range; model 'vitlens-demo' has 8 classes \(0\.\.7\)",
    ),
    "negative class index": (
        vitlens_pb2.ExplainRequest(
            images=[tensor_pb2.Image(encoded=_png())],
            target=vitlens_pb2.Target(per_image=vitlens_pb2.ClassIndices(indices=[-1])),
        ),
        r"class index -1 is out of range",
    ),
    "per-image targets mismatch": (
        vitlens_pb2.ExplainRequest(
            images=[tensor_pb2.Image(encoded=_png())],
            target=vitlens_pb2.Target(per_image=vitlens_pb2.ClassIndices(indices=[1, 2])),
        ),
        r"2 class indices for 1 images",
    ),
    "top_k too large": (
        vitlens_pb2.ExplainRequest(
            images=[tensor_pb2.Image(encoded=_png())], target=vitlens_pb2.Target(top_k=9)
        ),
        r"target\.top_k must lie in \[1, 8\]",
    ),
    "uint8 output dtype": (
        vitlens_pb2.ExplainRequest(
            images=[tensor_pb2.Image(encoded=_png())],
            options=vitlens_pb2.ExplainOptions(output_dtype=tensor_pb2.DTYPE_UINT8),
        ),
        r"output_dtype must be DTYPE_FLOAT32 or DTYPE_FLOAT16; got DTYPE_UINT8",
    ),
    "empty request": (vitlens_pb2.ExplainRequest(), r"the request has no images"),
    "too many images": (
        vitlens_pb2.ExplainRequest(images=[tensor_pb2.Image(encoded=_png())] * 9),
        r"9 images; this server accepts at most 8 per request",
    ),
    "oversized encoded image": (
        vitlens_pb2.ExplainRequest(images=[tensor_pb2.Image(encoded=_png(2000, 1000))]),
        r"2000x1000 = 2,000,000 pixels, above this server's limit of 1,000,000",
    ),
    "oversized tensor": (
        vitlens_pb2.ExplainRequest(images=[_tensor(np.zeros((1001, 1000), np.uint8))]),
        r"above this server's limit",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(client, case) -> None:
    request, message = BAD_REQUESTS[case]
    error = _raw(request, client)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert re.search(message, error.details()), error.details()
    assert client.explain(_png(), method="raw_attention")[0].heatmap.shape == (14, 14)


def test_sdk_raises_typed_errors(client: vitlens.Client) -> None:
    with pytest.raises(vitlens.InvalidArgumentError) as caught:
        client.explain(_png(), method="nope")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "valid methods" in caught.value.details


@pytest.mark.parametrize(
    ("images", "message"),
    [([], "the request has no images"), ([tensor_pb2.Image(encoded=b"??")], r"images\[0\]")],
)
def test_predict_rejects_bad_input_too(client: vitlens.Client, images, message) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.Predict(vitlens_pb2.PredictRequest(images=images), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, caught.value.details())
