"""Object detection figures: the boxes with their labels and scores, and a contact sheet.

`draw_detections` draws every detection's box over the image, outlined in its class's colour
and tagged with its label and probability, optionally over the detections' heatmaps (each
min-max scaled, their element-wise maximum blended in with `vitlens.overlay.overlay`).
`detection_sheet` lays out one panel with every box, then one panel per detection: its own
heatmap over the image and its box. Needs Pillow, imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitlens.overlay import _load_rgb, _pil, overlay
from vitlens.results import normalized_heatmap
from vitlens.text_overlay import _font, _ink, _text_size

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from vitlens.detection import Detection

__all__ = [
    "PALETTE",
    "SheetLayout",
    "box_colour",
    "combined_heatmap",
    "detection_caption",
    "detection_label",
    "detection_sheet",
    "draw_detections",
    "sheet_layout",
]

ImageSource = Any  # a PIL image, (H, W[, 3]) array, encoded bytes or a path
"""What the functions draw on: a PIL image, an (H, W, 3) uint8 array (greyscale and float in
0..1 are converted), encoded image bytes, or a path."""

BACKGROUND = (255, 255, 255)
# Box colours by class index (modulo): saturated, and far apart from one another.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 200, 255),
    (255, 64, 160),
    (64, 255, 64),
    (255, 176, 0),
    (160, 96, 255),
    (255, 255, 64),
    (0, 255, 190),
    (255, 96, 64),
    (96, 160, 255),
    (200, 255, 140),
)
_MARGIN, _GAP, _PAD = 10, 12, 3  # pixels: around the sheet, between panels, inside a tag


def box_colour(detection: Detection) -> tuple[int, int, int]:
    """The outline colour of a detection: its class's, from `PALETTE`."""
    return PALETTE[detection.prediction.index % len(PALETTE)]


def detection_label(detection: Detection) -> str:
    """The box's tag, e.g. "star 93%"."""
    return f"{detection.label} {detection.probability:.0%}"


def detection_caption(detection: Detection, rank: int | None = None) -> str:
    """A sheet panel's caption, e.g. "#1 star 93.1% · query 7"."""
    text = f"{detection.label} {detection.probability:.1%} · query {detection.query}"
    return text if rank is None else f"#{rank} {text}"


def combined_heatmap(detections: Sequence[Detection]) -> np.ndarray | None:
    """The element-wise maximum of the detections' min-max scaled heatmaps, (h, w) float32 in
    [0, 1]; None when none has a heatmap.

    Raises:
        ValueError: the heatmaps differ in shape.
    """
    maps = [normalized_heatmap(d.heatmap) for d in detections if d.heatmap is not None]
    maps = [m for m in maps if m.size]
    if not maps:
        return None
    shapes = {m.shape for m in maps}
    if len(shapes) > 1:
        raise ValueError(f"the detections' heatmaps differ in shape: {sorted(shapes)}")
    return np.max(np.stack(maps), axis=0)  # (h, w)


def _rgb(image: ImageSource) -> np.ndarray:
    """Any `ImageSource` as an (H, W, 3) uint8 array."""
    pil = _pil()
    rgb = np.asarray(image.convert("RGB")) if isinstance(image, pil.Image) else _load_rgb(image)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8 or rgb.size == 0:
        raise ValueError(f"image must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    return rgb


def _resized(rgb: np.ndarray, width: int) -> np.ndarray:
    """(H, W, 3) uint8 scaled to ``width`` pixels wide, keeping the aspect ratio."""
    height, old = rgb.shape[:2]
    if old == width:
        return rgb
    pil = _pil()
    size = (width, max(1, round(height * width / old)))
    return np.asarray(pil.fromarray(rgb).resize(size, pil.Resampling.BILINEAR))


def _draw_boxes(canvas: PILImage.Image, detections: Sequence[Detection]) -> None:
    """Outline each box on ``canvas`` in place and tag it with `detection_label`; the least
    probable first, so the most probable lies on top."""
    from PIL import ImageDraw

    width, height = canvas.size
    line = max(2, round(min(width, height) / 150))
    font = _font(int(np.clip(width // 30, 10, 24)))
    draw = ImageDraw.Draw(canvas)
    order = sorted(range(len(detections)), key=lambda i: detections[i].probability)
    for i in order:
        d = detections[i]
        colour = box_colour(d)
        x0, y0, x1, y1 = d.box.pixels(width, height)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=line)
        text = detection_label(d)
        text_w, text_h, left, top = _text_size(font, text)
        tag_w, tag_h = text_w + 2 * _PAD, text_h + 2 * _PAD
        tx = max(0, min(x0, width - tag_w))
        ty = y0 - tag_h if y0 >= tag_h else y0  # above the box, or inside at the image's top
        draw.rectangle((tx, ty, tx + tag_w - 1, ty + tag_h - 1), fill=colour)
        ink = _ink(np.asarray(colour, dtype=np.float64))
        draw.text((tx + _PAD - left, ty + _PAD - top), text, fill=ink, font=font)


def draw_detections(
    image: ImageSource,
    detections: Sequence[Detection],
    *,
    heatmaps: bool = True,
    alpha: float = 0.5,
    min_width: int = 256,
) -> PILImage.Image:
    """Every detection's box over the image, with its label and probability.

    Args:
        image: the image the detections are of (see `ImageSource`).
        detections: e.g. `ImageExplanation.detections` or `Classification.detections`.
        heatmaps: blend `combined_heatmap` of the detections' heatmaps over the image first
            (when at least one has a heatmap).
        alpha: the heatmap's weight in the blend.
        min_width: narrower images are enlarged to this width (aspect kept) so the tags are
            readable; 0 keeps the image's size.

    Returns:
        An RGB PIL image of the image's size, (max(W, min_width), H scaled alike).
    """
    pil = _pil()
    rgb = _rgb(image)
    heat = combined_heatmap(detections) if heatmaps else None
    if heat is not None:
        rgb = overlay(rgb, heat, alpha)
    if rgb.shape[1] < min_width:
        rgb = _resized(rgb, min_width)
    canvas = pil.fromarray(np.ascontiguousarray(rgb))
    _draw_boxes(canvas, detections)
    return canvas


@dataclass(frozen=True)
class SheetLayout:
    """Where `detection_sheet` puts its panels, in sheet pixels.

    Attributes:
        size: (width, height) of the sheet.
        panel_size: (width, height) of every panel's image.
        panels: the (x, y) top-left corner of each panel's image, in order (the caption band
            lies above it).
        captions: each panel's caption, in order.
    """

    size: tuple[int, int]
    panel_size: tuple[int, int]
    panels: tuple[tuple[int, int], ...]
    captions: tuple[str, ...]


def sheet_layout(
    captions: Sequence[str],
    panel_size: tuple[int, int],
    *,
    columns: int = 4,
    font_px: int = 14,
) -> SheetLayout:
    """Panels left to right in rows of ``columns``, each under its caption band."""
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    font = _font(font_px)
    band = max((_text_size(font, c)[1] for c in captions), default=0) + 2 * _PAD
    width, height = panel_size
    cols = max(1, min(columns, len(captions)))
    rows = max(1, -(-len(captions) // cols))
    cell_w, cell_h = width + _GAP, band + height + _GAP
    panels = tuple(
        (_MARGIN + (k % cols) * cell_w, _MARGIN + (k // cols) * cell_h + band)
        for k in range(len(captions))
    )
    size = (2 * _MARGIN + cols * cell_w - _GAP, 2 * _MARGIN + rows * cell_h - _GAP)
    return SheetLayout(size, panel_size, panels, tuple(captions))


def detection_sheet(
    image: ImageSource,
    detections: Sequence[Detection],
    *,
    columns: int = 4,
    panel_width: int = 256,
    alpha: float = 0.5,
    font_px: int = 14,
) -> PILImage.Image:
    """A contact sheet: every box on the image, then one panel per detection with its own
    heatmap over the image (the plain image when it has none) and its box.

    Args:
        image: the image the detections are of (see `ImageSource`).
        detections: in the order to show them (the server's: most probable first).
        columns: panels per row.
        panel_width: each panel's width in pixels; the height keeps the image's aspect.
        alpha: the heatmap's weight in the blend.
        font_px: caption font size.

    Returns:
        An RGB PIL image laid out as `sheet_layout` says, 1 + len(detections) panels, captions
        "all N detections" then `detection_caption` with the detection's rank.
    """
    pil = _pil()
    from PIL import ImageDraw

    if panel_width < 1:
        raise ValueError(f"panel_width must be at least 1, got {panel_width}")
    base = _resized(_rgb(image), panel_width)  # (h, panel_width, 3)
    count = len(detections)
    captions = [f"all {count} detection{'s' * (count != 1)}"]
    captions += [detection_caption(d, rank) for rank, d in enumerate(detections, 1)]
    layout = sheet_layout(
        captions, (base.shape[1], base.shape[0]), columns=columns, font_px=font_px
    )
    canvas = pil.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(font_px)
    for k, ((x, y), caption) in enumerate(zip(layout.panels, captions, strict=True)):
        if k == 0:
            panel = pil.fromarray(base)
            _draw_boxes(panel, detections)
        else:
            d = detections[k - 1]
            heat = d.heatmap
            shown = overlay(base, heat, alpha) if heat is not None and heat.size else base
            panel = pil.fromarray(np.ascontiguousarray(shown))
            _draw_boxes(panel, [d])
        canvas.paste(panel, (x, y))
        caption = _fit(font, caption, panel.width)
        _, text_h, left, top = _text_size(font, caption)
        ty = y - text_h - _PAD - top
        draw.text((x - left, ty), caption, fill=(0, 0, 0), font=font)
    return canvas


def _fit(font: Any, text: str, width: int) -> str:
    """``text``, cut short with an ellipsis to fit in ``width`` pixels."""
    if _text_size(font, text)[0] <= width:
        return text
    while text and _text_size(font, text + "…")[0] > width:
        text = text[:-1]
    return text + "…"
