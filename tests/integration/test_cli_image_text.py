"""`vitlens explain --text` / `vitlens predict --prompt` on image-text (CLIP) models, end to end
over real gRPC on loopback: a tiny random open_clip model in the real hub-dir format (labels and
template under the config's "vitlens" key) next to a tiny classifier. Each (image, text) pair
gets a heatmap overlay and a token PNG with one box per token, coloured in the order of the
token relevances; --text on a classifier is the server's INVALID_ARGUMENT, printed cleanly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningServer, start_server
from tests.tiny import tiny_loaded
from tests.unit.image_text_tiny import VIT_CFG, build_open_clip_module, write_open_clip_dir
from tests.unit.test_text_overlay import assert_ordered_as, box_colours
from vitlens import cli
from vitlens.results import TextRelevance
from vitlens.text_overlay import figure_layout
from vitlens_server.config import ServerConfig
from vitlens_server.models import ModelRegistry, ModelSpec, load_model

LABELS = ["red square", "blue circle", "green line"]
TEXTS = ["a red square", "two blue circles on grey"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    root = tmp_path_factory.mktemp("cli_image_text")
    clip = write_open_clip_dir(root / "clip", VIT_CFG, build_open_clip_module(VIT_CFG, seed=3))
    config = json.loads((clip / "open_clip_config.json").read_text())
    config["vitlens"] = {"labels": LABELS, "prompt_template": "a picture of a {}."}
    (clip / "open_clip_config.json").write_text(json.dumps(config))
    spec = ModelSpec(name="clip", architecture="open_clip", source=f"open_clip:{clip}")
    registry = ModelRegistry([tiny_loaded(seed=11), load_model(spec)])
    running, stop = start_server(ServerConfig(port=0, max_batch_size=4), registry)
    yield running
    stop()


@pytest.fixture
def scans(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for name in ("scan1.png", "scan2.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def check_token_png(folder: Path, entry: dict) -> None:
    """The token figure of one JSON entry: one box per token, ordered as the relevances."""
    text = entry["text"]
    relevance = np.asarray(text["relevance"], np.float32)
    assert len(text["tokens"]) == len(relevance) > 0
    tokens = TextRelevance(text["text"], tuple(text["tokens"]), relevance)
    layout = figure_layout(tokens, text["caption"])
    assert len(layout.boxes) == len(text["tokens"])
    colours = box_colours(Image.open(folder / text["file"]), layout)
    if relevance.max() > relevance.min():
        assert_ordered_as(colours, relevance)


def test_explain_texts_writes_an_overlay_and_a_token_png_per_image_and_text(
    served: RunningServer, scans: list[Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    argv = ["explain", *map(str, scans), "--server", served.address, "--model", "clip"]
    argv += ["--out", str(out)] + [arg for text in TEXTS for arg in ("--text", text)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count("logit") == len(scans) * len(TEXTS)
    assert all(repr(text) in printed for text in TEXTS)
    for scan in scans:
        report = json.loads((out / f"{scan.stem}.json").read_text())
        assert report["model"] == "clip" and report["method"] == "generic"
        entries = report["explanations"]
        assert [e["target"]["label"] for e in entries] == TEXTS
        assert [e["target"]["index"] for e in entries] == [0, 1]
        assert [e["text"]["text"] for e in entries] == TEXTS
        for entry in entries:
            assert entry["file"].startswith(f"{scan.stem}_{entry['target']['index']}_")
            assert Image.open(out / entry["file"]).size[0] >= 256  # the heatmap overlay
            assert f"logit {entry['target']['logit']:.2f}" in entry["text"]["caption"]
            check_token_png(out, entry)
    assert len(list(out.glob("*_tokens.png"))) == len(scans) * len(TEXTS)


def test_explain_zero_shot_explains_the_predicted_label_prompt(
    served: RunningServer, scans: list[Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "zero"
    argv = ["explain", str(scans[0]), "--server", served.address, "--model", "clip"]
    assert cli.main([*argv, "--out", str(out), "--method", "rollout"]) == 0
    printed = capsys.readouterr().out
    (entry,) = json.loads((out / "scan1.json").read_text())["explanations"]
    label = entry["target"]["label"]
    assert label in LABELS and printed.startswith(f"{scans[0]}: {label} ")
    assert entry["text"]["text"] == f"a picture of a {label}."
    assert (out / "scan1.png").is_file() and entry["text"]["file"] == "scan1_tokens.png"
    check_token_png(out, entry)
    assert cli.main([*argv, "--out", str(out), "--top-k", "2"]) == 0
    written = {p.name for p in out.glob("scan1_*_tokens.png")}
    assert len(written) == 2, written


def test_predict_prompts_ranks_the_prompts(
    served: RunningServer, scans: list[Path], capsys
) -> None:
    prompts = ["a red square", "a blue circle", "a cat"]
    argv = ["predict", str(scans[0]), "--server", served.address, "--model", "clip"]
    assert cli.main([*argv, *(a for p in prompts for a in ("--prompt", p))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(scans[0]) and len(lines) == 1 + len(prompts)
    assert {line.split("  ")[-2].strip() for line in lines[1:]} == set(prompts)
    assert all("(prompt " in line for line in lines[1:])
    assert cli.main(argv) == 0  # without prompts: zero-shot over the labels
    ranked = capsys.readouterr().out.splitlines()[1:]
    assert {line.split("  ")[-2].strip() for line in ranked} == set(LABELS)


def test_text_on_a_classifier_is_the_servers_invalid_argument(
    served: RunningServer, scans: list[Path], tmp_path: Path, capsys
) -> None:
    argv = ["explain", str(scans[0]), "--server", served.address, "--model", "tiny"]
    assert cli.main([*argv, "--out", str(tmp_path / "x"), "--text", "a red square"]) == 1
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()  # one line, no traceback
    assert line.startswith("error: INVALID_ARGUMENT: ") and "texts" in line, line
    assert "'tiny' is a classifier" in line  # the server's message, as it sent it
    assert captured.out == ""
    assert not list((tmp_path / "x").glob("*.png"))
    predict = ["predict", str(scans[0]), "--server", served.address, "--model", "tiny"]
    assert cli.main([*predict, "--prompt", "a cat"]) == 1
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: ")


def test_text_with_a_target_is_refused_before_calling(scans: list[Path], capsys) -> None:
    argv = ["explain", str(scans[0]), "--server", "127.0.0.1:1", "--text", "a", "--top-k", "2"]
    assert cli.main(argv) == 1
    assert "--text explains every text" in capsys.readouterr().err
