"""Token-relevance figures (`vitlens.text_overlay`): one box per token, coloured in the order of
the relevances, wrapped rows, captions; Pillow and torch stay unimported until drawing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitlens.overlay import colorize
from vitlens.results import Explanation, Prediction, TextRelevance
from vitlens.text_overlay import (
    BACKGROUND,
    TextFigure,
    figure_layout,
    render_text_relevance,
    save_text_relevance,
    text_caption,
)

ROOT = Path(__file__).resolve().parents[2]


def luminance(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb[..., 0] * 0.2126 + rgb[..., 1] * 0.7152 + rgb[..., 2] * 0.0722


def box_colours(figure: Image.Image, layout: TextFigure) -> np.ndarray:
    """The fill of every box, checked to be one uniform box with background between boxes.

    Reads the row one pixel inside each box's top edge: the padding above the token's ink.
    """
    pixels = np.asarray(figure.convert("RGB"))
    assert pixels.shape[1::-1] == layout.size
    colours = []
    for i, box in enumerate(layout.boxes):
        row = pixels[box.y0 + 1, box.x0 : box.x1]  # (w, 3)
        assert (row == row[0]).all(), f"box {i} ({box.token!r}) is not one uniform fill"
        assert tuple(row[0]) != BACKGROUND
        colours.append(row[0])
        following = layout.boxes[i + 1] if i + 1 < len(layout.boxes) else None
        if following is not None and following.y0 == box.y0:  # the gap to the next box
            gap = pixels[box.y0 + 1, box.x1 : following.x0]
            assert gap.size and (gap == BACKGROUND).all(), f"boxes {i} and {i + 1} touch"
    return np.array(colours)


def assert_ordered_as(colours: np.ndarray, relevance: np.ndarray) -> None:
    """Brighter is more relevant: the colours' luminance sorts as the relevances do."""
    lum = luminance(colours)
    r = np.asarray(relevance, dtype=np.float64)
    for i in range(len(r)):
        for j in range(len(r)):
            if r[i] < r[j]:
                assert lum[i] <= lum[j], (i, j, r[i], r[j], lum[i], lum[j])
    assert lum[int(np.argmax(r))] > lum[int(np.argmin(r))]


def test_one_box_per_token_coloured_in_relevance_order() -> None:
    relevance = np.array([0.03, 0.14, 0.75, 0.09, 0.0, 0.05], np.float32)
    text = TextRelevance("a photo of a star.", ("a", "photo", "of", "a", "star", "."), relevance)
    figure = render_text_relevance(text)
    layout = figure_layout(text)
    assert len(layout.boxes) == len(text.tokens)
    assert [b.token for b in layout.boxes] == list(text.tokens)
    assert len({b.y0 for b in layout.boxes}) == 1  # short text: one row
    colours = box_colours(figure, layout)
    assert_ordered_as(colours, relevance)
    # the exact fill: the colour map of relevance scaled from 0 to the largest
    r64 = relevance.astype(np.float64)
    expected = colorize((r64 / r64.max())[None])[0]
    np.testing.assert_array_equal(colours, expected)
    assert (layout.low, layout.high) == (0.0, pytest.approx(0.75))


def test_long_texts_wrap_and_keep_one_box_per_token() -> None:
    tokens = tuple(f"token{i}" for i in range(40))
    relevance = np.random.default_rng(0).random(40).astype(np.float32)
    text = TextRelevance(" ".join(tokens), tokens, relevance)
    figure = render_text_relevance(text, max_width=400)
    layout = figure_layout(text, max_width=400)
    assert len({b.y0 for b in layout.boxes}) > 1
    assert all(b.x1 - layout.boxes[0].x0 <= 400 for b in layout.boxes)
    assert_ordered_as(box_colours(figure, layout), relevance)


def test_negative_relevance_extends_the_bar_and_constant_relevance_is_one_colour() -> None:
    text = TextRelevance("a b c", ("a", "b", "c"), np.array([-1.0, 0.0, 1.0], np.float32))
    layout = figure_layout(text)
    assert (layout.low, layout.high) == (-1.0, 1.0)
    assert_ordered_as(box_colours(render_text_relevance(text), layout), text.relevance)
    flat = TextRelevance("a b", ("a", "b"), np.zeros(2, np.float32))
    colours = box_colours(render_text_relevance(flat), figure_layout(flat))
    assert (colours == colours[0]).all()


def test_token_count_must_match_relevance() -> None:
    with pytest.raises(ValueError, match="2 tokens but 3"):
        render_text_relevance(TextRelevance("a b", ("a", "b"), np.zeros(3, np.float32)))


def test_caption_and_saved_figure(tmp_path: Path) -> None:
    text = TextRelevance("a photo of a star.", ("a", "star"), np.array([0.1, 0.9], np.float32))
    pair = Explanation(
        Prediction(1, "a photo of a star.", 0.72, 6.4946), np.zeros((2, 2)), text=text
    )
    assert text_caption(pair, "generic") == '"a photo of a star." · logit 6.49 · p 72.0% · generic'
    zero_shot = Explanation(Prediction(3, "star", 0.9, 11.0), np.zeros((2, 2)), text=text)
    assert text_caption(zero_shot) == '"a photo of a star." · star · logit 11.00 · p 90.0%'
    entry = save_text_relevance(pair, tmp_path / "t.png", "generic")
    assert entry == {
        "text": "a photo of a star.",
        "tokens": ["a", "star"],
        "relevance": [pytest.approx(0.1), pytest.approx(0.9)],
        "file": "t.png",
        "caption": text_caption(pair, "generic"),
    }
    saved = Image.open(tmp_path / "t.png")
    layout = figure_layout(text, entry["caption"])
    assert_ordered_as(box_colours(saved, layout), text.relevance)
    with pytest.raises(ValueError, match="no text relevance"):
        save_text_relevance(Explanation(pair.target, pair.heatmap), tmp_path / "u.png")


def test_importing_the_module_imports_neither_torch_nor_pil() -> None:
    code = (
        "import sys, vitlens.text_overlay; "
        "assert 'torch' not in sys.modules and 'PIL' not in sys.modules, sorted(sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "client")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
