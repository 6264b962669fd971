"""Visual question answering figures: the image's relevance beside the question's, in one PNG.

The left panel is the image under its relevance: the heatmap blended over it
(`vitlens.overlay.overlay`), or, for models on detector regions, each region's box filled and
outlined in the colour of its relevance. The right panel is the question's tokens shaded by
relevance (`vitlens.text_overlay.render_text_relevance`, titled with the question). A caption
band over both names the answer. Needs Pillow, imported inside the functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vitlens.overlay import _load_rgb, _pil, colorize, overlay
from vitlens.text_overlay import _font, _text_size, relevance_range, render_text_relevance

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from vitlens.results import Explanation

__all__ = [
    "VqaFigure",
    "answer_caption",
    "image_panel",
    "region_overlay",
    "render_vqa_explanation",
    "vqa_layout",
]

BACKGROUND = (255, 255, 255)
_MARGIN, _GAP = 10, 16  # pixels: around everything, between the two panels
_REGION_ALPHA = 0.45  # a region's fill weight over the image


def answer_caption(explanation: Explanation, method: str = "") -> str:
    """E.g. 'answer "red" · p 87.0% · logit 4.20 · generic'."""
    t = explanation.target
    parts = [f'answer "{t.label or t.index}"', f"p {t.probability:.1%}", f"logit {t.logit:.2f}"]
    if method:
        parts.append(method)
    return " · ".join(parts)


def region_overlay(image_rgb: np.ndarray, boxes: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """Each region's box over the image in the colour of its relevance: (H, W, 3) uint8.

    Args:
        image_rgb: (H, W, 3) uint8.
        boxes: (R, 4) (x1, y1, x2, y2) as fractions of the image's width and height.
        relevance: (R,) one value per region, scaled like token relevance (from min(0,
            smallest) to the largest; brighter is more relevant).

    The image is dimmed to half; boxes are drawn from the least relevant to the most (the
    most relevant lies on top), each filled at `_REGION_ALPHA` and outlined at full colour.
    """
    image = _pil()
    from PIL import ImageDraw

    img = np.asarray(image_rgb)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # (R, 4)
    values = np.asarray(relevance, dtype=np.float64).reshape(-1)  # (R,)
    if len(values) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(values)} region relevance values")
    height, width = img.shape[:2]
    low, high = relevance_range(values)
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    colours = colorize(np.nan_to_num(scaled)[None])[0]  # (R, 3)
    canvas = img.astype(np.float32) * 0.5
    line = max(1, round(min(height, width) / 100))
    for r in np.argsort(np.nan_to_num(values), kind="stable"):
        x0, y0, x1, y1 = _pixels(boxes[r], width, height)
        fill = canvas[y0:y1, x0:x1]
        fill[:] = (1.0 - _REGION_ALPHA) * fill + _REGION_ALPHA * colours[r]
        outline = image.fromarray(np.rint(canvas).clip(0, 255).astype(np.uint8))
        ImageDraw.Draw(outline).rectangle(
            (x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)),
            outline=tuple(int(c) for c in colours[r]),
            width=line,
        )
        canvas = np.asarray(outline, dtype=np.float32)
    return np.rint(canvas).clip(0, 255).astype(np.uint8)


def _pixels(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """A fractional box as pixel bounds, at least one pixel wide and high."""
    x0 = int(np.clip(np.floor(box[0] * width), 0, width - 1))
    y0 = int(np.clip(np.floor(box[1] * height), 0, height - 1))
    x1 = int(np.clip(np.ceil(box[2] * width), x0 + 1, width))
    y1 = int(np.clip(np.ceil(box[3] * height), y0 + 1, height))
    return x0, y0, x1, y1


def image_panel(
    image_bytes_or_array: bytes | str | os.PathLike[str] | np.ndarray,
    explanation: Explanation,
    boxes: np.ndarray | None = None,
    *,
    alpha: float = 0.5,
    min_width: int = 256,
) -> PILImage.Image:
    """The left panel: the heatmap over the image, or (``region_relevance``) the regions'
    boxes; images narrower than ``min_width`` are enlarged to it."""
    image = _pil()
    rgb = _load_rgb(image_bytes_or_array)
    if explanation.region_relevance is not None:
        if boxes is None:
            raise ValueError("the explanation is per region: give the request's region boxes")
        panel = image.fromarray(region_overlay(rgb, boxes, explanation.region_relevance))
    else:
        panel = image.fromarray(overlay(rgb, explanation.heatmap, alpha))
    if panel.width < min_width:
        size = (min_width, max(1, round(panel.height * min_width / panel.width)))
        panel = panel.resize(size, image.Resampling.BILINEAR)
    return panel


@dataclass(frozen=True)
class VqaFigure:
    """Where `render_vqa_explanation` puts things, in figure pixels.

    Attributes:
        size: (width, height) of the figure.
        caption: the band's text.
        image_at: (x, y) of the image panel's top-left corner.
        tokens_at: (x, y) of the question panel's top-left corner (a `figure_layout` figure).
    """

    size: tuple[int, int]
    caption: str
    image_at: tuple[int, int]
    tokens_at: tuple[int, int]


def vqa_layout(
    caption: str, image_size: tuple[int, int], tokens_size: tuple[int, int], font_px: int = 18
) -> VqaFigure:
    """The caption band on top, then the image panel and the question panel side by side."""
    caption_w, caption_h, _, _ = _text_size(_font(font_px), caption)
    top = _MARGIN + caption_h + _MARGIN
    width = 2 * _MARGIN + max(caption_w, image_size[0] + _GAP + tokens_size[0])
    height = top + max(image_size[1], tokens_size[1]) + _MARGIN
    return VqaFigure(
        (width, height), caption, (_MARGIN, top), (_MARGIN + image_size[0] + _GAP, top)
    )


def render_vqa_explanation(
    image_bytes_or_array: bytes | str | os.PathLike[str] | np.ndarray,
    explanation: Explanation,
    caption: str | None = None,
    *,
    boxes: np.ndarray | None = None,
    font_px: int = 18,
    max_width: int = 480,
) -> PILImage.Image:
    """The explained answer as one figure: image relevance | question-token relevance.

    Args:
        image_bytes_or_array: the image (encoded bytes, a path, or an array).
        explanation: a VQA explanation (``question`` set; ``heatmap``, or ``region_relevance``
            with ``boxes``).
        caption: the band over both panels; None: `answer_caption`.
        boxes: (R, 4) the request's region boxes, for explanations per region.
        font_px: caption and token font size.
        max_width: the token rows wrap at this many pixels.

    Returns:
        An RGB PIL image laid out as `vqa_layout` says: `image_panel` at ``image_at``, the
        question's `render_text_relevance` figure (titled with the question) at ``tokens_at``.
    """
    image = _pil()
    from PIL import ImageDraw

    question = explanation.question
    if question is None:
        raise ValueError("the explanation has no question relevance (not a VQA model)")
    left = image_panel(image_bytes_or_array, explanation, boxes)
    right = render_text_relevance(
        question, f'"{question.text}"', font_px=font_px, max_width=max_width
    )
    text = answer_caption(explanation) if caption is None else caption
    fig = vqa_layout(text, left.size, right.size, font_px)
    canvas = image.new("RGB", fig.size, BACKGROUND)
    canvas.paste(left, fig.image_at)
    canvas.paste(right, fig.tokens_at)
    font = _font(font_px)
    _, _, x, y = _text_size(font, text)
    ImageDraw.Draw(canvas).text((_MARGIN - x, _MARGIN - y), text, fill=(0, 0, 0), font=font)
    return canvas
