"""Evaluate on image-text (CLIP) models over real gRPC: zero-shot over the label prompts.

A tiny random open_clip model whose labels are the scene classes is served beside one whose
labels are not. The service's numbers (its worker, batcher and chunking) must equal the same
`run_evaluation` in process on `ZeroShotLocalCalls` (the model called directly); the zero-shot
logits those calls read are checked against the model's own similarity, and what cannot run on
an image-text model is refused by field.

The in-process run explains the same batches as the served worker (`BATCH` images at a time).
Maps of one image computed in a batch of 3 and in a batch of 5 differ in float32 rounding
(~1e-7), and the deletion order of two pixels whose values are that close is decided by it; on
these random tiny CLIPs (logit scale 100) moving one pixel from one step of the curve to the
next changes the class probability by up to 0.17 — measured on the 2026-12-02 CI failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

import vitlens
from tests.conftest import RunningServer, start_server
from tests.unit.image_text_tiny import VIT_CFG, build_open_clip_module, write_open_clip_dir
from vitlens.images import to_image
from vitlens.tensors import numpy_to_tensor
from vitlens.v1 import vitlens_pb2, vitlens_pb2_grpc
from vitlens_server.config import ServerConfig
from vitlens_server.data.shapes import CLASSES
from vitlens_server.evaluate import (
    ZeroShotLocalCalls,
    parse_synthetic,
    plan_evaluation,
    run_evaluation,
)
from vitlens_server.models import ModelRegistry, ModelSpec, load_model
from vitlens_server.models.image_text import load_image_text_model

TEMPLATE = "a photo of a {}."
METRICS = ["deletion", "insertion", "average_drop", "perturbation", "segmentation"]
METHODS = ["generic", "rollout", "saliency", "transformer_attribution", "oracle"]
BATCH = 3


def _write(root: Path, name: str, labels, seed: int) -> Path:
    folder = write_open_clip_dir(root / name, VIT_CFG, build_open_clip_module(VIT_CFG, seed=seed))
    if labels:
        config = json.loads((folder / "open_clip_config.json").read_text())
        config["vitlens"] = {"labels": list(labels), "prompt_template": TEMPLATE}
        (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("image_text_evaluate")
    return {
        "scenes": _write(root, "scenes", CLASSES, seed=5),
        "other": _write(root, "other", ["cat", "dog"], seed=6),
        "unlabelled": _write(root, "unlabelled", (), seed=7),
    }


@pytest.fixture(scope="module")
def served(dirs) -> RunningServer:
    config = ServerConfig(port=0, max_batch_size=BATCH)  # chunks of 3: batching is exercised
    specs = [
        ModelSpec(name=name, architecture="open_clip", source=f"open_clip:{folder}")
        for name, folder in dirs.items()
    ]
    running, stop = start_server(config, ModelRegistry([load_model(s) for s in specs]))
    yield running
    stop()


@pytest.fixture
def client(served):
    with vitlens.Client(served.address, timeout_s=300) as c:
        yield c


@pytest.fixture(scope="module")
def local(dirs) -> ZeroShotLocalCalls:
    model = load_image_text_model(f"open_clip:{dirs['scenes']}")
    return ZeroShotLocalCalls(model, tuple(TEMPLATE.format(c) for c in CLASSES))


def _local(local, methods, metrics, dataset: str, **options):
    plan = plan_evaluation(methods, metrics, chunk_size=BATCH, **options)
    model = local._cache.model
    return run_evaluation(
        plan,
        parse_synthetic(dataset),
        local,
        input_size=tuple(model.preprocess.input_size[1:]),
        grid=tuple(model.image_graph.grid),
        num_classes=len(CLASSES),
    )


def _assert_same(served_result, summaries) -> None:
    for summary in summaries:
        got = served_result.get(summary.method, summary.metric)
        for name, stat in summary.values.items():
            value = got.value(name)
            assert value.n == stat.n, (summary.method, summary.metric, name)
            np.testing.assert_allclose(value.mean, stat.mean, rtol=1e-4, atol=1e-5)
        for curve in got.curves:
            _, y = summary.curves[curve.name]
            np.testing.assert_allclose(curve.y, y, rtol=1e-4, atol=1e-5)


def test_zero_shot_evaluate_equals_the_same_run_in_process(client, local) -> None:
    result = client.evaluate(METHODS, METRICS, model="scenes", dataset="synthetic:5")
    assert {(r.method, r.metric) for r in result.results} == {
        (m, k) for m in METHODS for k in METRICS
    }
    assert result.get("generic", "deletion").value("auc").n == 5
    _assert_same(result, _local(local, METHODS, METRICS, "synthetic:5"))


def test_class_sensitivity_with_text_targets(client, local) -> None:
    """Two-object scenes: each object's prompt explained in turn (the text target)."""
    dataset = "synthetic:4:two_object"
    result = client.evaluate(["generic", "oracle"], ["class_sensitivity"], model="scenes",
                             dataset=dataset)  # fmt: skip
    assert result.get("oracle", "class_sensitivity").value("difference").mean > 0.5
    _assert_same(result, _local(local, ["generic", "oracle"], ["class_sensitivity"], dataset))


def test_explain_label_explains_the_labels_prompt(client, local) -> None:
    result = client.evaluate(["generic"], ["average_drop"], model="scenes",
                             dataset="synthetic:4", explain_label=True)  # fmt: skip
    expected = _local(local, ["generic"], ["average_drop"], "synthetic:4", explain_label=True)
    _assert_same(result, expected)


def test_zero_shot_logits_are_the_models_similarities(local) -> None:
    model = local._cache.model
    pixels = torch.rand(3, 3, *model.preprocess.input_size[1:])
    with torch.no_grad():
        images = model.encode_images(model.preprocess.normalise(pixels))
        texts = model.encode_texts(model.tokenize(list(local.prompts)))
        expected = model.similarity(images, texts)
    torch.testing.assert_close(local.logits(pixels), expected.float())


def _refused(client, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(vitlens.VitlensError) as info:
        client.evaluate(**kwargs)
    fields = [v.field for v in info.value.field_violations]
    return info.value.code, fields[0] if fields else ""


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"methods": ["generic"], "metrics": ["sanity"]}, "metrics"),
        ({"methods": ["attention_flow"], "metrics": ["deletion"]}, "methods"),
        ({"methods": ["partial_lrp"], "metrics": ["deletion"]}, "methods"),
        (
            {
                "methods": ["saliency"],
                "metrics": ["deletion"],
                "method_options": {"saliency": {"samples": -1}},
            },
            "method_options[saliency]",
        ),
        ({"methods": ["generic"], "metrics": ["deletion"], "model": "other"}, "dataset.synthetic"),
    ],
)
def test_what_cannot_run_on_an_image_text_model_is_refused_by_field(client, kwargs, field):
    kwargs = {"model": "scenes", "dataset": "synthetic:2", **kwargs}
    code, got = _refused(client, **kwargs)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert got.startswith(field)


def _inline(labels: list[int]) -> vitlens_pb2.Dataset:
    """Inline samples: random 32 px images, each with a mask of its middle."""
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    samples = [
        vitlens_pb2.Sample(
            image=to_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
            label=label,
            mask=numpy_to_tensor(mask),
        )
        for label in labels
    ]
    return vitlens_pb2.Dataset(inline=vitlens_pb2.InlineDataset(samples=samples))


def _stream(served, **fields) -> list[vitlens_pb2.EvaluateEvent]:
    with grpc.insecure_channel(served.address) as channel:
        stub = vitlens_pb2_grpc.VitlensServiceStub(channel)
        return list(stub.Evaluate(vitlens_pb2.EvaluateRequest(**fields), timeout=120))


def test_inline_samples_are_labelled_with_the_models_own_classes(served) -> None:
    """Raw stubs: labels index the model's labels (cat, dog), so any label set can be scored."""
    events = _stream(served, model="other", methods=["generic", "oracle"],
                     metrics=["segmentation"], dataset=_inline([1, 0, 1]))  # fmt: skip
    results = [e.result for e in events if e.HasField("result")]
    assert {r.method for r in results} == {"generic", "oracle"}
    oracle = next(r for r in results if r.method == "oracle")
    assert {v.name: v.n for v in oracle.values}["iou"] == 3
    with pytest.raises(grpc.RpcError) as info:
        _stream(served, model="other", methods=["generic"], metrics=["segmentation"],
                dataset=_inline([0, 2]))  # fmt: skip
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dataset.inline.samples[1].label" in info.value.details()


def test_a_model_without_labels_cannot_be_scored_zero_shot(served) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _stream(served, model="unlabelled", methods=["generic"], metrics=["segmentation"],
                dataset=_inline([0]))  # fmt: skip
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no labels" in info.value.details()
