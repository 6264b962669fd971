"""Heatmap rendering: a colour map, heatmap-over-image blending and captioned PNG figures.

Needs Pillow (``pip install "vitlens[cli]"``), imported inside the functions that use it so that
``import vitlens.overlay`` stays cheap.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from vitlens.results import Explanation

__all__ = ["colorize", "default_caption", "overlay", "render_explanation", "require_pillow"]

# A dark-to-bright "ember" map: black, indigo, crimson, orange, pale yellow. Rows are
# (position, r, g, b); Rec. 709 luminance rises at every step, so brighter always means more
# relevant, also in greyscale print.
_CONTROL_POINTS = np.array(
    [
        [0.00, 2, 2, 8],
        [0.14, 30, 12, 70],
        [0.29, 84, 16, 110],
        [0.43, 134, 33, 106],
        [0.57, 184, 55, 86],
        [0.71, 226, 88, 52],
        [0.84, 248, 140, 16],
        [0.93, 250, 198, 48],
        [1.00, 252, 254, 166],
    ],
    dtype=np.float64,
)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError('rendering heatmaps needs Pillow: pip install "vitlens[cli]"') from None
    return Image


def require_pillow() -> None:
    """Raise ImportError with the install command when Pillow is missing."""
    _pil()


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to colours: (H, W) float -> (H, W, 3) uint8.

    Values are clipped to [0, 1] and NaN counts as 0; min-max normalise first (e.g.
    `Explanation.normalized`) for raw heatmaps.
    """
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0)
    h = np.clip(h, 0.0, 1.0)
    pos = _CONTROL_POINTS[:, 0]
    rgb = np.stack([np.interp(h, pos, _CONTROL_POINTS[:, c]) for c in (1, 2, 3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)  # (H, W, 3)


def _normalize(h: np.ndarray) -> np.ndarray:
    lo, hi = float(np.nanmin(h)), float(np.nanmax(h))
    if not np.isfinite(hi - lo) or hi <= lo:
        return np.zeros_like(h)
    return (h - lo) / (hi - lo)


def overlay(image_rgb: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colorized heatmap over an image.

    Args:
        image_rgb: (H, W, 3) uint8 (an (H, W) greyscale image is expanded to RGB).
        heatmap: (h, w) raw relevance at any resolution; resized bilinearly to (H, W) and
            min-max normalised.
        alpha: heatmap weight, 0 (image only) to 1 (heatmap only).

    Returns:
        (H, W, 3) uint8.
    """
    image = _pil()
    img = np.asarray(image_rgb)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.ndim != 2 or hm.size == 0:
        raise ValueError(f"heatmap must be a non-empty (h, w) array, got shape {hm.shape}")
    height, width = img.shape[:2]
    resized = image.fromarray(np.ascontiguousarray(hm)).resize(
        (width, height), image.Resampling.BILINEAR
    )
    colours = colorize(_normalize(np.asarray(resized, dtype=np.float32)))  # (H, W, 3)
    a = float(np.clip(alpha, 0.0, 1.0))
    blended = (1.0 - a) * img.astype(np.float32) + a * colours.astype(np.float32)
    return np.rint(blended).clip(0, 255).astype(np.uint8)


def _load_rgb(source: bytes | str | os.PathLike[str] | np.ndarray) -> np.ndarray:
    """Encoded bytes, a path or an array -> (H, W, 3) uint8."""
    if isinstance(source, np.ndarray):
        arr = source
        if arr.dtype.kind == "f":
            arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]
        return arr.astype(np.uint8, copy=False)
    image = _pil()
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    with image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def default_caption(explanation: Explanation, method: str = "") -> str:
    """E.g. "triangle 93.1% · generic"."""
    t = explanation.target
    label = t.label or f"class {t.index}"
    text = f"{label} {t.probability:.1%}"
    return f"{text} · {method}" if method else text


def render_explanation(
    image_bytes_or_array: bytes | str | os.PathLike[str] | np.ndarray,
    explanation: Explanation,
    caption: str | None = None,
    *,
    alpha: float = 0.5,
    min_width: int = 256,
) -> PILImage.Image:
    """The heatmap overlaid on the image, under a caption band.

    Args:
        image_bytes_or_array: encoded image bytes, a path, or an (H, W[, C]) array (uint8, or
            float in 0..1).
        explanation: supplies the heatmap (any resolution).
        caption: text of the band; None uses `default_caption` (label and probability).
        alpha: heatmap weight in the blend.
        min_width: small images are enlarged to at least this width so the caption fits.

    Returns:
        An RGB PIL image of size (W', H' + band height).
    """
    image = _pil()
    from PIL import ImageDraw, ImageFont

    blended = image.fromarray(overlay(_load_rgb(image_bytes_or_array), explanation.heatmap, alpha))
    if blended.width < min_width:
        scale = min_width / blended.width
        size = (min_width, max(1, round(blended.height * scale)))
        blended = blended.resize(size, image.Resampling.BILINEAR)
    text = default_caption(explanation) if caption is None else caption
    font_px = int(np.clip(blended.width // 22, 12, 32))
    try:
        font = ImageFont.load_default(size=font_px)  # Pillow >= 10.1, scalable
    except TypeError:
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(blended)
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    pad = 6
    band = (bottom - top) + 2 * pad
    width = max(blended.width, right - left + 2 * pad)
    canvas = image.new("RGB", (width, blended.height + band), (255, 255, 255))
    canvas.paste(blended, ((width - blended.width) // 2, band))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, fill=(0, 0, 0), font=font)
    return canvas
