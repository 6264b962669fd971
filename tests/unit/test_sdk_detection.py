"""The SDK's object detection side without a server: `Box` / `Detection` parsed from hand-built
messages, the detection options of Explain and Predict requests (set only when asked, checked
before any call), the box figures (`vitlens.detection_overlay`), then Client, AsyncClient and
``vitlens explain`` / ``predict`` against an in-process fake detector."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

import vitlens
from vitlens import cli
from vitlens.build import build_explain_request, build_predict_request
from vitlens.detection import Box, Detection, build_detection_options, check_threshold
from vitlens.detection_overlay import (
    box_colour,
    combined_heatmap,
    detection_caption,
    detection_label,
    detection_sheet,
    draw_detections,
    sheet_layout,
)
from vitlens.results import Classification, ExplainResult, ImageExplanation, Prediction
from vitlens.tensors import numpy_to_tensor
from vitlens.v1 import vitlens_pb2, vitlens_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
LABELS = ("square", "circle", "triangle")
HEAT_SQUARE = np.float32([[4, 2, 0], [0, 0, 0]])  # (2, 3): relevant at the top left
HEAT_CIRCLE = np.float32([[0, 0, 0], [0, 1, 3]])  # (2, 3): relevant at the bottom right


def detection_message(
    query: int, index: int, probability: float, box: tuple, heat: np.ndarray | None
) -> dict:
    d = {
        "query": query,
        "prediction": {
            "index": index,
            "label": LABELS[index],
            "probability": probability,
            "logit": 2.5,
        },
        "box": dict(zip(("x1", "y1", "x2", "y2"), box, strict=True)),
    }
    if heat is not None:
        d["heatmap"] = numpy_to_tensor(heat)
        d["query_relevance"] = [0.0, 0.25, 1.0, 0.5]
    return d


def detections(heatmaps: bool = True) -> list[dict]:
    """Two detections, most probable first: a square at the top left, a circle at the bottom
    right."""
    return [
        detection_message(2, 0, 0.9, (0.0, 0.0, 0.5, 0.5), HEAT_SQUARE if heatmaps else None),
        detection_message(7, 1, 0.625, (0.5, 0.5, 1.0, 1.0), HEAT_CIRCLE if heatmaps else None),
    ]


def parsed(heatmaps: bool = True) -> list[Detection]:
    return [Detection.from_proto(vitlens_pb2.Detection(**d)) for d in detections(heatmaps)]


# ----------------------------------------------------------------------------- responses


def test_box_pixels_by_hand() -> None:
    box = Box.from_proto(vitlens_pb2.Box(x1=0.25, y1=0.1, x2=0.5, y2=0.55))
    assert (box.x1, box.y2) == (0.25, pytest.approx(0.55))
    # float32 0.1 * 20 = 2.0000000298 and 0.55 * 20 = 11.0000002: still pixels 2 to 10
    assert box.pixels(40, 20) == (10, 2, 20, 11)
    assert Box(0.26, 0.0, 0.49, 1.0).pixels(40, 20) == (10, 0, 20, 20)  # partly covered: in
    assert Box(0.0, 0.0, 1.0, 1.0).pixels(7, 3) == (0, 0, 7, 3)
    assert Box(1.0, 1.0, 1.0, 1.0).pixels(8, 8) == (7, 7, 8, 8)  # at least one pixel
    assert Box(-0.5, 0.2, 1.5, 0.2).pixels(10, 10) == (0, 2, 10, 3)  # clipped
    assert Box(0.0, 0.0, 0.5, 0.25).area == pytest.approx(0.125)
    assert str(Box(0.1, 0.2, 0.5, 0.6)) == "(0.100, 0.200, 0.500, 0.600)"
    with pytest.raises(ValueError, match="at least 1 x 1"):
        box.pixels(0, 10)


def test_detection_from_proto() -> None:
    square, circle = parsed()
    assert (square.query, square.label, square.probability) == (2, "square", pytest.approx(0.9))
    assert square.prediction == Prediction(0, "square", pytest.approx(0.9), 2.5)
    assert square.box == Box(0.0, 0.0, 0.5, 0.5)
    np.testing.assert_array_equal(square.heatmap, HEAT_SQUARE)
    np.testing.assert_array_equal(square.normalized(), HEAT_SQUARE / 4)
    np.testing.assert_array_equal(circle.normalized(), HEAT_CIRCLE / 3)
    assert square.query_relevance.dtype == np.float32
    np.testing.assert_array_equal(square.query_relevance, [0.0, 0.25, 1.0, 0.5])
    assert str(circle) == "circle 62.5% box (0.500, 0.500, 1.000, 1.000) (query 7)"
    bare = Detection.from_proto(vitlens_pb2.Detection(**detections(heatmaps=False)[0]))
    assert bare.heatmap is None and bare.query_relevance is None and bare.normalized() is None
    half = vitlens_pb2.Detection(heatmap=numpy_to_tensor(HEAT_SQUARE.astype(np.float16)))
    assert Detection.from_proto(half).heatmap.dtype == np.float16
    assert Detection.from_proto(half).label == "0"  # no label: the class index


def test_image_explanations_and_classifications_carry_detections() -> None:
    response = vitlens_pb2.ExplainResponse(
        model="detr",
        method="generic",
        results=[{"id": "a", "detections": detections()}, {"id": "b"}],
    )
    result = ExplainResult.from_proto(response)
    first, second = result
    assert [d.query for d in first.detections] == [2, 7] and first.explanations == ()
    assert first.detections[1].heatmap.shape == (2, 3)
    assert second.detections == ()
    with pytest.raises(ValueError, match=r"no explanations \(a detector's: see .detections\)"):
        _ = first.heatmap
    classifier = ImageExplanation.from_proto(
        vitlens_pb2.ImageExplanation(id="c", predictions=[{"index": 1}])
    )
    assert classifier.detections == ()
    c = Classification.from_proto(
        vitlens_pb2.Classification(id="p", detections=detections(heatmaps=False))
    )
    assert [d.label for d in c.detections] == ["square", "circle"] and c.predictions == ()
    assert c.detections[0].heatmap is None
    assert Classification.from_proto(vitlens_pb2.Classification(id="q")).detections == ()


def test_model_info_object_detection() -> None:
    info = vitlens.ModelInfo.from_proto(
        vitlens_pb2.ModelInfo(
            name="detr",
            task=vitlens_pb2.TASK_OBJECT_DETECTION,
            labels=LABELS,
            modalities=[{"name": "image", "num_tokens": 49}, {"name": "queries", "num_tokens": 4}],
        )
    )
    assert info.task == "object_detection" and info.object_detection
    assert not info.vqa and not info.image_text and info.modalities["queries"] == 4
    plain = vitlens.ModelInfo.from_proto(
        vitlens_pb2.ModelInfo(task=vitlens_pb2.TASK_CLASSIFICATION)
    )
    assert not plain.object_detection
    assert cli._model_row(info, "")[1] == "detector"


# ------------------------------------------------------------------------------ requests


def test_detection_options_are_set_only_when_given() -> None:
    plain = build_explain_request([b"a", b"b"])
    assert not plain.HasField("detection")
    assert plain.target.WhichOneof("selector") == "predicted"  # unchanged for other models
    assert build_detection_options() is None
    assert build_detection_options(None, 0, None) is None
    request = build_explain_request(b"a", detection_threshold=0.7, max_detections=3)
    assert request.HasField("detection") and not request.HasField("target")
    assert request.detection.HasField("threshold")
    assert request.detection.threshold == pytest.approx(0.7)
    assert request.detection.max_detections == 3 and list(request.detection.queries) == []
    chosen = build_explain_request(b"a", queries=(q for q in (4, np.int64(9))))
    assert list(chosen.detection.queries) == [4, 9]
    assert not chosen.detection.HasField("threshold") and chosen.detection.max_detections == 0
    zero = build_explain_request(b"a", detection_threshold=0)  # given: the server's default
    assert zero.HasField("detection") and zero.detection.HasField("threshold")
    only_max = build_explain_request(b"a", max_detections=1)
    assert only_max.HasField("detection") and not only_max.detection.HasField("threshold")


def test_predict_detection_threshold() -> None:
    assert not build_predict_request(b"a").HasField("detection_threshold")
    request = build_predict_request([b"a", b"b"], detection_threshold=0.25)
    assert request.HasField("detection_threshold") and request.detection_threshold == 0.25
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        build_predict_request(b"a", detection_threshold=1.0)


@pytest.mark.parametrize("value", [-0.01, 1.0, 1.5, math.nan, math.inf])
def test_threshold_outside_zero_one_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match=r"detection_threshold must be in \[0, 1\)"):
        build_explain_request(b"a", detection_threshold=value)


def test_thresholds_inside_are_kept() -> None:
    assert check_threshold(0) == 0.0 and check_threshold(np.float32(0.5)) == 0.5
    assert check_threshold(0.999) == 0.999


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"detection_threshold": "0.5"}, TypeError, "must be a number, got str"),
        ({"detection_threshold": True}, TypeError, "must be a number, got bool"),
        ({"detection_threshold": 0.5, "queries": [1]}, ValueError, "either detection_threshold"),
        ({"queries": []}, ValueError, "queries is empty"),
        ({"queries": "12"}, TypeError, "sequence of ints"),
        ({"queries": [1, -1]}, ValueError, "queries must be at least 0"),
        ({"queries": [3, 1, 3]}, ValueError, r"queries repeats a query: \[3, 1, 3\]"),
        ({"queries": [1.5]}, TypeError, "queries must be an int, got float"),
        ({"max_detections": -1}, ValueError, "max_detections must be at least 0"),
        ({"max_detections": 2.0}, TypeError, "max_detections must be an int"),
        ({"max_detections": 2, "target": 1}, ValueError, "target and top_k choose classes"),
        ({"queries": [0], "top_k": 2}, ValueError, "target and top_k choose classes"),
    ],
)
def test_client_side_refusals(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build_explain_request(b"a", **kwargs)


# ------------------------------------------------------------------------------- figures

GREY = 120


def grey(height: int = 60, width: int = 300) -> np.ndarray:
    return np.full((height, width, 3), GREY, np.uint8)


def test_draw_detections_outlines_each_box_in_its_colour() -> None:
    image = grey()
    square, circle = parsed()
    drawn = draw_detections(image, [square, circle], heatmaps=False)
    assert drawn.size == (300, 60) and drawn.mode == "RGB"  # wide enough: the image's size
    pixels = np.asarray(drawn)
    x0, y0, x1, y1 = circle.box.pixels(300, 60)  # (150, 30, 300, 60)
    np.testing.assert_array_equal(pixels[y1 - 1, (x0 + x1) // 2], box_colour(circle))
    np.testing.assert_array_equal(pixels[(y0 + y1) // 2, x0], box_colour(circle))
    np.testing.assert_array_equal(pixels[50, 75], [GREY] * 3)  # in neither box: untouched
    np.testing.assert_array_equal(pixels[45, 225], [GREY] * 3)  # inside a box: untouched
    np.testing.assert_array_equal(pixels[29, 59], box_colour(square))  # the square's bottom
    assert box_colour(square) != box_colour(circle)
    tag = pixels[y0 - 3, x0 + 2 : x0 + 10]  # the circle's tag, above its box
    assert (tag == box_colour(circle)).all(axis=-1).any()
    empty = np.asarray(draw_detections(image, [], heatmaps=True))
    np.testing.assert_array_equal(empty, image)


def test_draw_detections_sizes_and_inputs() -> None:
    small = grey(40, 64)
    dets = parsed()
    assert draw_detections(small, dets).size == (256, 160)  # enlarged to min_width
    assert draw_detections(small, dets, min_width=0).size == (64, 40)
    pil = draw_detections(Image.fromarray(small).convert("L"), dets, min_width=0)
    assert pil.size == (64, 40) and pil.mode == "RGB"
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        draw_detections(np.zeros((4, 4, 2), np.uint8), dets)


def test_heatmaps_are_blended_under_the_boxes() -> None:
    image = grey()
    dets = parsed()
    plain = np.asarray(draw_detections(image, dets, heatmaps=False)).astype(int)
    heated = np.asarray(draw_detections(image, dets, heatmaps=True)).astype(int)
    # (2, 3) maps over 60 x 300: the square's peak at the top left, the circle's bottom right
    assert np.abs(heated[15:25, 20:60] - plain[15:25, 20:60]).sum() > 0
    assert heated[5:25, 10:50].mean() > heated[5:25, 120:160].mean()
    assert heated[50:58, 260:290].mean() > heated[50:58, 120:160].mean()
    combined = combined_heatmap(dets)
    np.testing.assert_allclose(combined, np.maximum(HEAT_SQUARE / 4, HEAT_CIRCLE / 3))
    assert combined_heatmap(parsed(heatmaps=False)) is None
    other = Detection(1, dets[0].prediction, dets[0].box, np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match="differ in shape"):
        combined_heatmap([dets[0], other])


def test_labels_and_captions() -> None:
    square, circle = parsed()
    assert detection_label(square) == "square 90%"
    assert detection_caption(circle, 2) == "#2 circle 62.5% · query 7"
    assert detection_caption(circle) == "circle 62.5% · query 7"


def test_detection_sheet_has_one_panel_per_detection() -> None:
    image = grey(60, 120)
    square, circle = parsed()
    sheet = detection_sheet(image, [square, circle], panel_width=240, columns=2)
    captions = ["all 2 detections", detection_caption(square, 1), detection_caption(circle, 2)]
    layout = sheet_layout(captions, (240, 120), columns=2)
    assert sheet.size == layout.size and len(layout.panels) == 3
    (ax, ay), (bx, by), (cx, cy) = layout.panels
    assert ay == by < cy and ax == cx < bx  # two per row
    pixels = np.asarray(sheet)
    # The first panel: every box on the plain (enlarged) image.
    base = np.asarray(Image.fromarray(image).resize((240, 120), Image.Resampling.BILINEAR))
    expected = np.asarray(draw_detections(base, [square, circle], heatmaps=False, min_width=0))
    np.testing.assert_array_equal(pixels[ay : ay + 120, ax : ax + 240], expected)
    # Then each detection's own heatmap and only its box.
    second = pixels[by : by + 120, bx : bx + 240].astype(int)
    third = pixels[cy : cy + 120, cx : cx + 240].astype(int)
    assert second[10:40, 10:60].mean() > third[10:40, 10:60].mean() + 30  # square's map
    assert third[90:118, 180:238].mean() > second[90:118, 180:238].mean() + 30  # circle's map
    x0, _, x1, y1 = circle.box.pixels(240, 120)
    np.testing.assert_array_equal(third[y1 - 1, (x0 + x1) // 2], box_colour(circle))
    assert tuple(second[y1 - 1, (x0 + x1) // 2]) != box_colour(circle)  # not the square's panel
    only_boxes = detection_sheet(image, parsed(heatmaps=False), panel_width=100)
    assert only_boxes.size == sheet_layout(captions, (100, 50)).size
    assert detection_sheet(image, []).size == sheet_layout(["all 0 detections"], (256, 128)).size


# ----------------------------------------------------------------- clients, fake servicer


class FakeDetector(vitlens_pb2_grpc.VitlensServiceServicer):
    """A detector "detr" (the default) and a classifier "demo"; records the requests."""

    def __init__(self) -> None:
        self.requests: list[object] = []

    def Explain(self, request, context) -> vitlens_pb2.ExplainResponse:
        self.requests.append(request)
        results = [{"id": img.id, "detections": detections()} for img in request.images]
        return vitlens_pb2.ExplainResponse(
            model="detr", method=request.method or "generic", results=results
        )

    def Predict(self, request, context) -> vitlens_pb2.PredictResponse:
        self.requests.append(request)
        results = [{"id": img.id, "detections": detections(False)} for img in request.images]
        return vitlens_pb2.PredictResponse(model="detr", results=results)

    def ListModels(self, request, context) -> vitlens_pb2.ListModelsResponse:
        models = [
            vitlens_pb2.ModelInfo(name="detr", task=vitlens_pb2.TASK_OBJECT_DETECTION),
            vitlens_pb2.ModelInfo(name="demo", task=vitlens_pb2.TASK_CLASSIFICATION),
        ]
        return vitlens_pb2.ListModelsResponse(models=models, default_model="detr")

    def GetModel(self, request, context) -> vitlens_pb2.ModelInfo:
        for info in self.ListModels(None, context).models:
            if info.name == (request.name or "detr"):
                return info
        context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")


@pytest.fixture
def fake():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = FakeDetector()
    vitlens_pb2_grpc.add_VitlensServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def test_client_explain_and_predict(fake) -> None:
    address, servicer = fake
    with vitlens.Client(address, timeout_s=10) as client:
        result = client.explain([b"a", b"b"], detection_threshold=0.75, max_detections=2)
        sent = servicer.requests[-1].detection
        assert sent.threshold == 0.75 and sent.max_detections == 2
        assert [len(r.detections) for r in result] == [2, 2]
        assert result[1].detections[0].heatmap.shape == (2, 3)
        client.explain(b"a")
        assert not servicer.requests[-1].HasField("detection")
        (c,) = client.predict(b"a", detection_threshold=0.3)
        assert servicer.requests[-1].detection_threshold == pytest.approx(0.3)
        assert [d.query for d in c.detections] == [2, 7] and c.detections[0].heatmap is None
        assert client.model().object_detection
        with pytest.raises(ValueError, match="either detection_threshold or queries"):
            client.explain(b"a", detection_threshold=0.5, queries=[1])


async def test_async_client_explain_and_predict(fake) -> None:
    address, servicer = fake
    async with vitlens.AsyncClient(address, timeout_s=10) as client:
        result = await client.explain(b"a", queries=[3, 1])
        assert list(servicer.requests[-1].detection.queries) == [3, 1]
        assert result[0].detections[1].label == "circle"
        (c,) = await client.predict(b"a", detection_threshold=0.5)
        assert servicer.requests[-1].HasField("detection_threshold")
        assert c.detections[1].box == Box(0.5, 0.5, 1.0, 1.0)


# ----------------------------------------------------------------------------------- CLI


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_cli_explain_writes_the_figures_and_record(fake, picture, tmp_path, capsys) -> None:
    address, servicer = fake
    out = tmp_path / "out"
    argv = ["explain", str(picture), "--server", address, "--model", "detr", "--out", str(out)]
    assert cli.main([*argv, "--threshold", "0.6", "--max-detections", "2"]) == 0
    sent = servicer.requests[-1]
    assert sent.model == "detr" and not sent.HasField("target")
    assert sent.detection.threshold == pytest.approx(0.6) and sent.detection.max_detections == 2
    boxes, sheet = out / "scene_detections.png", out / "scene_sheet.png"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{picture}: 2 detections -> {boxes}, {sheet}"
    assert printed[1] == "  #1    90.0%  square  box (0.000, 0.000, 0.500, 0.500)  query 2"
    assert printed[2].startswith("  #2    62.5%  circle  box (0.500, 0.500, 1.000, 1.000)")
    figure = Image.open(boxes)
    expected = draw_detections(picture.read_bytes(), parsed())
    assert figure.size == expected.size == (256, 192)
    np.testing.assert_array_equal(np.asarray(figure.convert("RGB")), np.asarray(expected))
    assert Image.open(sheet).size == detection_sheet(picture.read_bytes(), parsed()).size
    record = json.loads((out / "scene.json").read_text())
    assert record["files"] == ["scene_detections.png", "scene_sheet.png"]
    first, second = record["detections"]
    assert first["query"] == 2 and first["prediction"]["label"] == "square"
    assert first["box"] == {"x1": 0.0, "y1": 0.0, "x2": 0.5, "y2": 0.5}
    assert first["heatmap_shape"] == [2, 3] and first["heatmap_max"] == 4.0
    assert second["query_relevance"] == [0.0, 0.25, 1.0, 0.5]


def test_cli_explain_on_the_default_detector(fake, picture, tmp_path) -> None:
    address, servicer = fake
    argv = ["explain", str(picture), "--server", address, "--out", str(tmp_path / "o")]
    assert cli.main([*argv, "--queries", "3,7", "--queries", "9", "--grid", "input"]) == 0
    sent = servicer.requests[-1]
    assert list(sent.detection.queries) == [3, 7, 9]
    assert sent.options.grid == vitlens_pb2.OUTPUT_GRID_INPUT
    assert cli.main(argv) == 0  # no options: the server's defaults
    assert not servicer.requests[-1].HasField("detection")
    assert (tmp_path / "o" / "scene_sheet.png").is_file()


def test_cli_predict_and_models_show_detections(fake, picture, capsys) -> None:
    address, _ = fake
    assert cli.main(["predict", str(picture), "--server", address]) == 0
    printed = capsys.readouterr().out
    assert "#2    62.5%  circle  box (0.500, 0.500, 1.000, 1.000)  query 7" in printed
    assert cli.main(["models", "--server", address]) == 0
    assert "detr *  detector" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "1.5"], "detection_threshold must be in [0, 1)"),
        (["--max-detections", "-1"], "max_detections must be at least 0"),
        (["--threshold", "0.5", "--queries", "1"], "either detection_threshold or queries"),
        (["--target", "1"], "--target and --top-k choose classes"),
        (["--model", "demo", "--threshold", "0.5"], "'demo' is a classification model"),
        (["--text", "a square", "--threshold", "0.5"], "--text is for image-text models"),
        (["--model", "missing"], "error: NOT_FOUND: no model 'missing'"),
    ],
)
def test_cli_refusals(fake, picture, tmp_path, capsys, extra, message) -> None:
    address, servicer = fake
    argv = ["explain", str(picture), "--server", address, "--out", str(tmp_path / "x")]
    assert cli.main([*argv, *extra]) == 1
    assert message in capsys.readouterr().err
    assert servicer.requests == []  # refused before any Explain call
    assert not list(tmp_path.glob("x/*.png"))


def test_cli_queries_must_be_indices(fake, picture, capsys) -> None:
    address, _ = fake
    with pytest.raises(SystemExit):
        cli.main(["explain", str(picture), "--server", address, "--queries", "a,b"])
    assert "expected query indices" in capsys.readouterr().err


def test_the_detection_modules_import_neither_torch_nor_pil() -> None:
    code = (
        "import sys, vitlens, vitlens.cli, vitlens.cli_detection, vitlens.detection, "
        "vitlens.detection_overlay; "
        "assert 'torch' not in sys.modules and 'PIL' not in sys.modules, sorted(sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "client")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
