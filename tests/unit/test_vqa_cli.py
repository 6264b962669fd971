"""VQA figures (`vitlens.vqa_overlay`) and the ``vitlens explain --question`` / ``vitlens answer``
commands on fabricated responses from an in-process fake servicer: one PNG per answer with the
image's relevance (heatmap, or region boxes) beside the question's tokens shaded by relevance,
a JSON record, the answers printed; refusals as clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.unit.test_sdk_vqa import BOXES, FakeVqa, vqa_explanation
from tests.unit.test_text_overlay import assert_ordered_as, box_colours, luminance
from vitlens import cli
from vitlens.results import Explanation, Prediction, TextRelevance
from vitlens.text_overlay import figure_layout
from vitlens.v1 import vitlens_pb2, vitlens_pb2_grpc
from vitlens.vqa_overlay import (
    answer_caption,
    image_panel,
    region_overlay,
    render_vqa_explanation,
    vqa_layout,
)

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "what colour is the star?"


@pytest.fixture
def fake():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = FakeVqa()
    vitlens_pb2_grpc.add_VitlensServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "star.png"
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def explanation(heatmap: np.ndarray | None = None, regions: np.ndarray | None = None):
    tokens = ("what", "colour", "is", "the", "star", "?")
    question = TextRelevance(QUESTION, tokens, np.float32([0.05, 0.6, 0.01, 0.02, 0.3, 0.0]))
    return Explanation(
        Prediction(2, "red", 0.875, 4.2),
        np.zeros((0, 0), np.float32) if heatmap is None else heatmap,
        text=question,
        region_relevance=regions,
    )


def check_figure(figure: Image.Image, e: Explanation, panel: Image.Image, caption: str) -> None:
    """The panel at ``image_at``, the question's token boxes at ``tokens_at``, in order."""
    tokens = figure_layout(e.question, f'"{e.question.text}"', max_width=480)
    layout = vqa_layout(caption, panel.size, tokens.size)
    assert figure.size == layout.size
    x, y = layout.image_at
    crop = np.asarray(figure)[y : y + panel.height, x : x + panel.width]
    np.testing.assert_array_equal(crop, np.asarray(panel))
    tx, ty = layout.tokens_at
    strip = figure.crop((tx, ty, tx + tokens.size[0], ty + tokens.size[1]))
    assert_ordered_as(box_colours(strip, tokens), e.question.relevance)
    assert tx >= x + panel.width  # side by side, the question to the right


def test_heatmap_beside_the_question_tokens() -> None:
    image = np.full((30, 45, 3), 90, np.uint8)
    heat = np.float32([[0, 0, 1], [0, 0, 1]])  # (2, 3): the right column relevant
    e = explanation(heatmap=heat)
    figure = render_vqa_explanation(image, e, "answer")
    panel = image_panel(image, e)
    assert panel.width == 256  # small images enlarged
    check_figure(figure, e, panel, "answer")
    lum = luminance(np.asarray(panel))
    assert lum[:, -20:].mean() > lum[:, :20].mean() + 30


def test_regions_are_boxes_shaded_by_relevance() -> None:
    image = np.full((40, 40, 3), 200, np.uint8)
    boxes = np.float32([[0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 1.0, 1.0]])
    drawn = region_overlay(image, boxes, np.float32([0.1, 1.0]))
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    np.testing.assert_array_equal(drawn[30, 5], [100, 100, 100])  # outside: dimmed to half
    assert luminance(drawn[30, 30]) > luminance(drawn[5, 5])  # inside: brighter when relevant
    with pytest.raises(ValueError, match="2 boxes but 3"):
        region_overlay(image, boxes, np.zeros(3))
    e = explanation(regions=np.float32([0.1, 1.0]))
    panel = image_panel(image, e, boxes)
    check_figure(render_vqa_explanation(image, e, "c", boxes=boxes), e, panel, "c")
    with pytest.raises(ValueError, match="region boxes"):
        image_panel(image, e)


def test_caption_and_refusal() -> None:
    e = explanation(heatmap=np.ones((2, 2), np.float32))
    assert answer_caption(e, "generic") == 'answer "red" · p 87.5% · logit 4.20 · generic'
    plain = Explanation(e.target, e.heatmap)
    with pytest.raises(ValueError, match="no question relevance"):
        render_vqa_explanation(np.zeros((8, 8, 3), np.uint8), plain)


def test_cli_explain_question_writes_one_figure_and_record(fake, picture, tmp_path, capsys) -> None:
    address, servicer = fake
    out = tmp_path / "out"
    argv = ["explain", str(picture), "--server", address, "--model", "vitlens-vilt"]
    assert cli.main([*argv, "--question", QUESTION, "--out", str(out)]) == 0
    sent = servicer.requests[-1]
    assert list(sent.questions) == [QUESTION] and sent.model == "vitlens-vilt"
    printed = capsys.readouterr().out
    assert f'star.png: "{QUESTION}" -> red 80.0% -> {out / "star.png"}' in printed
    record = json.loads((out / "star.json").read_text())
    assert record["question"] == "what colour?" and record["answers"][0]["label"] == "red"
    (entry,) = record["explanations"]
    assert entry["question"]["tokens"] == ["what", "colour", "?"]
    assert entry["heatmap_shape"] == [2, 2] and "region_relevance" not in entry
    e = Explanation.from_proto(vitlens_pb2.Explanation(**vqa_explanation()))
    check_figure(
        Image.open(out / "star.png").convert("RGB"),
        e,
        image_panel(picture.read_bytes(), e),
        entry["caption"],
    )


def test_cli_explain_regions_and_top_k(fake, picture, tmp_path) -> None:
    address, servicer = fake
    npz = tmp_path / "regions.npz"
    np.savez(npz, features=np.ones((2, 3), np.float32), boxes=BOXES)
    out = tmp_path / "out"
    argv = ["explain", str(picture), "--server", address, "--question", "q?", "--out", str(out)]
    assert cli.main([*argv, "--regions", str(npz), "--top-k", "1"]) == 0
    (regions,) = servicer.requests[-1].regions
    assert list(regions.boxes.shape) == [2, 4] and servicer.requests[-1].target.top_k == 1
    record = json.loads((out / "star.json").read_text())
    (entry,) = record["explanations"]
    assert entry["file"] == "star_red.png" and entry["region_relevance"] == [0.25, 1.0]
    e = Explanation.from_proto(vitlens_pb2.Explanation(**vqa_explanation(regions=True)))
    panel = image_panel(picture.read_bytes(), e, BOXES)
    figure = Image.open(out / "star_red.png").convert("RGB")
    check_figure(figure, e, panel, entry["caption"])


def test_cli_answer_prints_answers(fake, picture, tmp_path, capsys) -> None:
    address, servicer = fake
    other = tmp_path / "other.png"
    other.write_bytes(picture.read_bytes())
    argv = ["answer", str(picture), str(other), "--server", address, "--top-k", "1"]
    assert cli.main([*argv, "--question", "one?", "--question", "two?"]) == 0
    assert list(servicer.requests[-1].questions) == ["one?", "two?"]
    printed = capsys.readouterr().out
    assert f'{other}: "two?"' in printed and "75.00%  red  (answer 2)" in printed
    assert cli.main(["models", "--server", address]) == 0
    assert "vitlens-vilt *  vqa" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--question", "a?", "--question", "b?", "--question", "c?"], "3 --question for 2"),
        (["--question", "a?", "--text", "a red star"], "--text is for image-text"),
        (["--regions", "r.npz"], "--regions needs --question"),
        (["--question", "a?", "--regions", "r.npz"], "1 --regions for 2 images"),
    ],
)
def test_cli_refusals(fake, picture, tmp_path, capsys, extra, message) -> None:
    address, _ = fake
    argv = ["explain", str(picture), str(picture), "--server", address, "--out", str(tmp_path)]
    assert cli.main([*argv, *extra]) == 1
    assert message in capsys.readouterr().err


def test_the_vqa_modules_import_neither_torch_nor_pil() -> None:
    code = (
        "import sys, vitlens.cli, vitlens.cli_vqa, vitlens.vqa, vitlens.vqa_overlay; "
        "assert 'torch' not in sys.modules and 'PIL' not in sys.modules, sorted(sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "client")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
