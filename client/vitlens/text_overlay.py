"""Text-token relevance figures for image-text (CLIP) explanations.

A text's tokens (`vitlens.results.TextRelevance`) are drawn as a strip of boxes, one per token,
each filled with the heatmap colour map (`vitlens.overlay.colorize`) of its relevance, under a
caption (the text, its image-text logit) and over a colour bar. Needs Pillow (``pip install
"vitlens[cli]"``), imported inside the functions, like `vitlens.overlay`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitlens.overlay import _pil, colorize

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from vitlens.results import Explanation, TextRelevance

__all__ = [
    "TextFigure",
    "TokenBox",
    "figure_layout",
    "layout_tokens",
    "relevance_range",
    "render_text_relevance",
    "save_text_relevance",
    "text_caption",
]

BACKGROUND = (255, 255, 255)
_PAD_X, _PAD_Y, _GAP, _MARGIN = 6, 5, 4, 10  # pixels: inside a box, between boxes, around all


@dataclass(frozen=True)
class TokenBox:
    """Where one token is drawn: its box (x0, y0) to (x1, y1), exclusive, in strip pixels."""

    token: str
    x0: int
    y0: int
    x1: int
    y1: int


def _font(size_px: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size_px)  # Pillow >= 10.1, scalable
    except TypeError:
        return ImageFont.load_default()


def _text_size(font: Any, text: str) -> tuple[int, int, int, int]:
    """(width, height, left, top) of ``text``'s ink box in ``font``."""
    from PIL import ImageDraw

    left, top, right, bottom = ImageDraw.Draw(_pil().new("RGB", (1, 1))).textbbox(
        (0, 0), text, font=font
    )
    return right - left, bottom - top, left, top


def layout_tokens(
    tokens: tuple[str, ...] | list[str], *, font_px: int = 18, max_width: int = 720
) -> list[TokenBox]:
    """One box per token, left to right, wrapped onto new rows at ``max_width`` pixels.

    Every box of a row has the row's height (the font's line box); boxes are `_GAP` pixels
    apart, so a scan along a row meets one run of colour per token.
    """
    font = _font(font_px)
    _, line_h, _, _ = _text_size(font, "Ag|")
    height = line_h + 2 * _PAD_Y
    boxes: list[TokenBox] = []
    x = y = 0
    for token in tokens:
        width = max(_text_size(font, token or " ")[0], font_px // 2) + 2 * _PAD_X
        if x > 0 and x + width > max_width:
            x, y = 0, y + height + _GAP
        boxes.append(TokenBox(token, x, y, x + width, y + height))
        x += width + _GAP
    return boxes


def relevance_range(relevance: np.ndarray) -> tuple[float, float]:
    """The colour bar's (low, high): from min(0, smallest) to the largest relevance."""
    r = np.nan_to_num(np.asarray(relevance, dtype=np.float64), nan=0.0)
    if r.size == 0:
        return 0.0, 1.0
    return min(0.0, float(r.min())), float(r.max())


def _scaled(relevance: np.ndarray, low: float, high: float) -> np.ndarray:
    r = np.nan_to_num(np.asarray(relevance, dtype=np.float64), nan=0.0)
    if not high > low:
        return np.zeros_like(r)
    return (r - low) / (high - low)


def text_caption(explanation: Explanation, method: str = "") -> str:
    """E.g. '"a red star" · logit 12.31 · p 87.0% · generic'; the explained label too when the
    text is a zero-shot label prompt."""
    t = explanation.target
    text = explanation.text.text if explanation.text is not None else t.label
    parts = [f'"{text}"']
    if t.label and t.label != text:
        parts.append(t.label)
    parts += [f"logit {t.logit:.2f}", f"p {t.probability:.1%}"]
    if method:
        parts.append(method)
    return " · ".join(parts)


def _ink(rgb: np.ndarray) -> tuple[int, int, int]:
    """Black on light fills, white on dark ones (Rec. 709 luminance)."""
    luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return (0, 0, 0) if luminance > 110 else (255, 255, 255)


@dataclass(frozen=True)
class TextFigure:
    """Where `render_text_relevance` draws everything, in figure pixels.

    Attributes:
        size: (width, height) of the figure.
        title: the caption line.
        boxes: one per token, in order, in figure coordinates.
        bar: the colour bar's (x0, y0, x1, y1), exclusive.
        low, high: the relevance at the bar's left and right ends.
    """

    size: tuple[int, int]
    title: str
    boxes: tuple[TokenBox, ...]
    bar: tuple[int, int, int, int]
    low: float
    high: float


_BAR_W, _BAR_H = 200, 12


def figure_layout(
    text: TextRelevance, caption: str | None = None, *, font_px: int = 18, max_width: int = 720
) -> TextFigure:
    """The layout of `render_text_relevance` (same arguments), without drawing."""
    relevance = np.asarray(text.relevance).reshape(-1)  # (T,)
    if relevance.shape[0] != len(text.tokens):
        raise ValueError(f"{len(text.tokens)} tokens but {relevance.shape[0]} relevance values")
    low, high = relevance_range(relevance)
    font, small = _font(font_px), _font(_small_px(font_px))
    title = f'"{text.text}"' if caption is None else caption
    title_w, title_h, _, _ = _text_size(font, title)
    boxes = layout_tokens(text.tokens, font_px=font_px, max_width=max_width)
    strip_w = max((b.x1 for b in boxes), default=0)
    strip_h = max((b.y1 for b in boxes), default=0)
    legend_w, legend_h, _, _ = _text_size(small, _legend(low, high))
    strip_y = _MARGIN + title_h + _MARGIN
    placed = tuple(
        TokenBox(b.token, _MARGIN + b.x0, strip_y + b.y0, _MARGIN + b.x1, strip_y + b.y1)
        for b in boxes
    )
    bar_y = strip_y + strip_h + _MARGIN
    bar_x = _MARGIN + _text_size(small, _number(low))[0] + _GAP
    width = 2 * _MARGIN + max(title_w, strip_w, _BAR_W + legend_w + 2 * _GAP)
    height = bar_y + max(_BAR_H, legend_h) + _MARGIN
    bar = (bar_x, bar_y, bar_x + _BAR_W, bar_y + _BAR_H)
    return TextFigure((width, height), title, placed, bar, low, high)


def _small_px(font_px: int) -> int:
    return max(10, font_px * 2 // 3)


def _number(value: float) -> str:
    return f"{value:.3g}"


def _legend(low: float, high: float) -> str:
    return f"{_number(low)} {_number(high)} relevance"


def render_text_relevance(
    text: TextRelevance,
    caption: str | None = None,
    *,
    font_px: int = 18,
    max_width: int = 720,
) -> PILImage.Image:
    """The text's tokens as boxes coloured by relevance, under a caption, over a colour bar.

    Args:
        text: the tokens and one relevance each (`Explanation.text`).
        caption: the top line; None: the text in quotes (`text_caption` adds the logit).
        font_px: token font size.
        max_width: token rows wrap at this many pixels.

    Returns:
        An RGB PIL image on a white background, laid out as `figure_layout` says. Token colours
        are `colorize` of the relevance scaled from `relevance_range`'s low (0 unless a
        relevance is negative) to the largest relevance, so brighter boxes are more relevant;
        the colour bar is labelled with both ends.
    """
    image = _pil()
    from PIL import ImageDraw

    fig = figure_layout(text, caption, font_px=font_px, max_width=max_width)
    relevance = np.asarray(text.relevance, dtype=np.float64).reshape(-1)  # (T,)
    colours = colorize(_scaled(relevance, fig.low, fig.high)[None])[0]  # (T, 3)
    font, small = _font(font_px), _font(_small_px(font_px))
    _, _, left, top = _text_size(font, fig.title)
    _, _, _, line_top = _text_size(font, "Ag|")
    canvas = image.new("RGB", fig.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((_MARGIN - left, _MARGIN - top), fig.title, fill=(0, 0, 0), font=font)
    for box, colour in zip(fig.boxes, colours, strict=True):
        draw.rectangle((box.x0, box.y0, box.x1 - 1, box.y1 - 1), fill=tuple(int(c) for c in colour))
        token_w, _, token_left, _ = _text_size(font, box.token)
        x = box.x0 + (box.x1 - box.x0 - token_w) // 2 - token_left
        draw.text((x, box.y0 + _PAD_Y - line_top), box.token, fill=_ink(colour), font=font)
    # The colour bar: "low [ramp] high relevance".
    x0, y0, x1, y1 = fig.bar
    ramp = np.linspace(0.0, 1.0, x1 - x0)[None].repeat(y1 - y0, axis=0)  # (bar_h, bar_w)
    canvas.paste(image.fromarray(colorize(ramp)), (x0, y0))
    _, label_h, _, label_top = _text_size(small, _legend(fig.low, fig.high))
    y = y0 + (y1 - y0 - label_h) // 2 - label_top
    draw.text((_MARGIN, y), _number(fig.low), fill=(0, 0, 0), font=small)
    draw.text((x1 + _GAP, y), f"{_number(fig.high)} relevance", fill=(0, 0, 0), font=small)
    return canvas


def save_text_relevance(explanation: Explanation, path: Path, method: str = "") -> dict[str, Any]:
    """Write the explanation's token figure to ``path`` (PNG) under `text_caption`; returns
    the text, its tokens, their relevance, the file name and the caption, as JSON values."""
    text = explanation.text
    if text is None:
        raise ValueError("the explanation has no text relevance (not an image-text model)")
    caption = text_caption(explanation, method)
    render_text_relevance(text, caption).save(path)
    return {
        "text": text.text,
        "tokens": list(text.tokens),
        "relevance": [float(r) for r in text.relevance],
        "file": path.name,
        "caption": caption,
    }
