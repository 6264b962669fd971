"""Object detectors served through the one data plane, over real gRPC on loopback.

A tiny random DETR (saved with ``save_pretrained``, 96 x 96 inputs by its preprocessor config) is
served next to the tiny classifier. Detections and their maps are compared with the engine run
in the test on the same model and pixels, one image and one detection at a time — independent of
the server's decoding, batching, vectorised backward pass and encoding.
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
from tests.tiny import tiny_loaded
from tests.unit.detr_tiny import LABELS, NUM_QUERIES, SIDE, save_tiny_detr
from vitlens.errors import from_rpc_error
from vitlens.images import to_images
from vitlens.tensors import tensor_to_numpy
from vitlens.v1 import vitlens_pb2
from vitlens_server.config import ServerConfig
from vitlens_server.data import CLASSES, SceneConfig, split_seeds
from vitlens_server.data.coco import export_coco
from vitlens_server.explain.detection import DETECTION_METHODS, explain_detections
from vitlens_server.models import ModelRegistry, ModelSpec, load_model


@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> Path:
    path = save_tiny_detr(Path(tmp_path_factory.mktemp("detr")) / "detr", seed=3)
    (path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": SIDE, "width": SIDE}, "image_mean": [0.5] * 3,
                    "image_std": [0.5] * 3})
    )  # fmt: skip
    (path / "vitlens.json").write_text(json.dumps({"metadata": {"note": "tiny, random"}}))
    return path


@pytest.fixture(scope="module")
def detector(directory):
    return load_model(ModelSpec(name="d", architecture="hf-detr", source=f"hf-detr:{directory}"))


@pytest.fixture(scope="module")
def served(directory) -> RunningServer:
    config = ServerConfig(port=0, max_images_per_request=8, max_batch_size=2)
    spec = ModelSpec(name="detr", architecture="hf-detr", source=f"hf-detr:{directory}")
    running, stop = start_server(config, ModelRegistry([tiny_loaded(seed=11), load_model(spec)]))
    yield running
    stop()


@pytest.fixture
def stub(served):
    with vitlens.Client(served.address, timeout_s=120) as client:
        yield client.stub


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(n)]


def explain(stub, pictures, method="generic", **detection) -> vitlens_pb2.ExplainResponse:
    request = vitlens_pb2.ExplainRequest(model="detr", method=method, images=to_images(pictures))
    if detection:
        request.detection.CopyFrom(vitlens_pb2.DetectionOptions(**detection))
    return stub.Explain(request)


def _reference(detector, picture: np.ndarray, query: int, method: str):
    pixels = torch.from_numpy(picture).permute(2, 0, 1).float()[None] / 255
    out = explain_detections(
        detector.adapter,
        detector.normalise(pixels),
        DETECTION_METHODS[method],
        select=[torch.tensor([query])],
    )
    return out.heatmaps(0)[0].numpy(), out.query_relevance[0][0].numpy()


def _options(values: dict) -> vitlens_pb2.ExplainOptions:
    options = vitlens_pb2.ExplainOptions()
    options.method_options.update(values)
    return options


def _code(call) -> tuple[str, str]:
    """The status code and first field violation of a raw stub call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = from_rpc_error(info.value)
    fields = [v.field for v in err.field_violations]
    return err.code.name, fields[0] if fields else ""


def test_get_model_reports_a_detector(stub) -> None:
    info = stub.GetModel(vitlens_pb2.GetModelRequest(name="detr"))
    assert info.task == vitlens_pb2.TASK_OBJECT_DETECTION
    assert tuple(info.labels) == LABELS and info.architecture == "DetrForObjectDetection"
    assert {(m.name, m.num_tokens) for m in info.modalities} == {("image", 9), ("queries", 5)}
    assert {m.name for m in info.methods} == set(DETECTION_METHODS)
    assert list(info.patch_grid) == [3, 3] and list(info.input_size) == [3, SIDE, SIDE]
    assert info.weights.metadata["note"] == "tiny, random"


@pytest.mark.parametrize("method", ["generic", "rollout", "gradcam", "transformer_attribution"])
def test_every_detection_of_every_image_equals_it_explained_alone(stub, detector, method):
    pictures = images(3)
    queries = [4, 0, 2]
    response = explain(stub, pictures, method, queries=queries)
    assert response.method == method
    for picture, result in zip(pictures, response.results, strict=True):
        assert [d.query for d in result.detections] == queries
        assert not result.explanations
        for found in result.detections:
            heatmap, relevance = _reference(detector, picture, found.query, method)
            np.testing.assert_allclose(
                tensor_to_numpy(found.heatmap), heatmap, rtol=1e-4, atol=1e-6
            )
            np.testing.assert_allclose(found.query_relevance, relevance, rtol=1e-4, atol=1e-6)
            assert len(found.query_relevance) == NUM_QUERIES
            box = found.box
            assert 0 <= box.x1 <= box.x2 <= 1 and 0 <= box.y1 <= box.y2 <= 1
            assert found.prediction.label == LABELS[found.prediction.index]


def test_threshold_selects_what_predict_detects(stub) -> None:
    pictures = images(4, seed=2)
    predicted = stub.Predict(
        vitlens_pb2.PredictRequest(
            model="detr", images=to_images(pictures), detection_threshold=0.2
        )
    )
    explained = explain(stub, pictures, "raw_attention", threshold=0.2)
    total = 0
    for p, e in zip(predicted.results, explained.results, strict=True):
        assert not p.predictions
        assert [d.query for d in p.detections] == [d.query for d in e.detections]
        probs = [d.prediction.probability for d in p.detections]
        assert probs == sorted(probs, reverse=True) and all(q > 0.2 for q in probs)
        for a, b in zip(p.detections, e.detections, strict=True):
            assert a.box == b.box and a.prediction.index == b.prediction.index
            assert not a.HasField("heatmap") and b.HasField("heatmap")
        total += len(p.detections)
    assert total > 0  # the tiny model's random queries do pass 0.2 somewhere
    capped = explain(stub, pictures, "raw_attention", threshold=0.2, max_detections=1)
    assert all(len(r.detections) <= 1 for r in capped.results)


def test_input_grid_upsamples_each_map(stub) -> None:
    request = vitlens_pb2.ExplainRequest(
        model="detr",
        images=to_images(images(1)),
        detection=vitlens_pb2.DetectionOptions(queries=[1]),
        options=vitlens_pb2.ExplainOptions(grid=vitlens_pb2.OUTPUT_GRID_INPUT),
    )
    found = stub.Explain(request).results[0].detections[0]
    assert tensor_to_numpy(found.heatmap).shape == (SIDE, SIDE)


def test_requests_a_detector_cannot_serve_are_refused(stub) -> None:
    picture = to_images(images(1))
    options = vitlens_pb2.DetectionOptions
    bad = [
        (dict(target=vitlens_pb2.Target(class_index=0)), "target"),
        (dict(detection=options(queries=[NUM_QUERIES])), "detection.queries[0]"),
        (dict(detection=options(queries=[1, 1])), "detection.queries"),
        (dict(detection=options(threshold=1.5)), "detection.threshold"),
        (dict(method="token_reflection"), "method"),
        (dict(questions=["is there a cat?"]), "questions"),
        (dict(texts=["a cat"]), "texts"),
        (
            dict(options=vitlens_pb2.ExplainOptions(return_relevance=True)),
            "options.return_relevance",
        ),
    ]
    for fields, where in bad:
        request = vitlens_pb2.ExplainRequest(model="detr", images=picture, **fields)
        assert _code(lambda r=request: stub.Explain(r)) == ("INVALID_ARGUMENT", where), fields
    threshold = vitlens_pb2.PredictRequest(model="detr", images=picture, detection_threshold=-0.1)
    assert _code(lambda: stub.Predict(threshold)) == ("INVALID_ARGUMENT", "detection_threshold")


def test_other_models_refuse_detection_options(stub) -> None:
    picture = to_images(images(1))
    request = vitlens_pb2.ExplainRequest(
        images=picture, detection=vitlens_pb2.DetectionOptions(max_detections=2)
    )
    assert _code(lambda: stub.Explain(request)) == ("INVALID_ARGUMENT", "detection")
    predict = vitlens_pb2.PredictRequest(images=picture, detection_threshold=0.5)
    assert _code(lambda: stub.Predict(predict)) == ("INVALID_ARGUMENT", "detection_threshold")


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[RunningServer, Path]:
    """A server with a tiny DETR over the scenes' classes, and a COCO export of the first six
    held-out detection scenes at its 96 px input, under the allowed dataset root."""
    root = Path(tmp_path_factory.mktemp("scored"))
    path = save_tiny_detr(
        root / "detr8", seed=4, id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)},
    )  # fmt: skip
    (path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": SIDE, "width": SIDE}})
    )
    export_coco(root / "data" / "coco", split_seeds("test", 6), config=SceneConfig(size=SIDE))
    config = ServerConfig(port=0, max_batch_size=4, dataset_roots=(root / "data",))
    spec = ModelSpec(name="detr8", architecture="hf-detr", source=f"hf-detr:{path}")
    running, stop = start_server(config, ModelRegistry([load_model(spec)]))
    yield running, root / "data" / "coco"
    stop()


def test_evaluate_scores_detection_segmentation_alike_on_scenes_and_their_coco_export(scored):
    running, coco = scored
    progress = []
    options = {"detection_segmentation": {"resamples": 3}}
    metrics = ["detection_segmentation", "detection"]
    with vitlens.Client(running.address, timeout_s=300) as client:
        runs = [
            client.evaluate(
                ["generic", "random"],
                metrics,
                dataset=dataset,
                model="detr8",
                metric_options=options,
                on_progress=progress.append,
            )
            for dataset in ("synthetic_detection:6", str(coco))
        ]
    for run in runs:
        assert {(r.method, r.metric) for r in run.results} == {
            ("generic", "detection_segmentation"),
            ("random", "detection_segmentation"),
            ("detector", "detection"),
        }
        segmentation = run.get("generic", "detection_segmentation")
        names = {v.name for v in segmentation.values}
        assert {"ap", "ap20", "ap50", "ar", "ap_medium", "ar_large"} <= names
        assert segmentation.value("ap").n == 6
        assert all(0 <= v.mean <= 1 or np.isnan(v.mean) for v in segmentation.values)
    synthetic, exported = runs
    for a, b in zip(synthetic.results, exported.results, strict=True):
        for value in a.values:
            other = b.value(value.name).mean
            assert value.mean == pytest.approx(other, nan_ok=True), (a.method, value.name)
    assert progress and progress[-1].done == progress[-1].total


def test_evaluate_refuses_what_a_detector_cannot_score(scored, served):
    running, _ = scored
    bad = [
        dict(methods=["token_reflection"], metrics=["detection_segmentation"]),
        dict(methods=["generic"], metrics=["perturbation"]),
        dict(methods=["generic"], metrics=["detection"], dataset="synthetic:4"),
    ]
    with vitlens.Client(running.address, timeout_s=60) as client:
        for kwargs in bad:
            with pytest.raises(vitlens.VitlensError) as info:
                client.evaluate(model="detr8", **{"dataset": "synthetic_detection:2", **kwargs})
            assert info.value.code.name == "INVALID_ARGUMENT", kwargs
    with vitlens.Client(served.address, timeout_s=60) as client:  # cat/dog/kite: not the scenes'
        with pytest.raises(vitlens.VitlensError) as info:
            client.evaluate(
                ["generic"],
                ["detection_segmentation"],
                dataset="synthetic_detection:2",
                model="detr",
            )
        assert info.value.code.name == "FAILED_PRECONDITION"
