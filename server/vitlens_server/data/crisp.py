"""Crisp attributes: an optional way of drawing single objects whose captions are unambiguous.

By default (`SceneConfig.crisp` is None) an object's colour is a free RGB triple, its size and
position continuous, so many scenes sit close to a caption's boundary (a colour half-way between
two named ones, an object just off centre). A captioned ground-truth dataset (like CLEVR) instead
draws each attribute from a few separated values; `CrispAttributes` does that for the object of
a single-object scene:

- **colour**: one of ``palette`` (in a seeded order, the first with enough contrast to the
  background, as for free colours) with a uniform jitter of at most ``palette_jitter`` per
  channel, so its nearest palette colour is the one drawn;
- **size**: a visible area (fraction of the image) drawn in one of ``area_bands``; the radius is
  the one that gives the shape that area (shapes differ in area at the same radius);
- **position**: the mask centroid aims at one of ``anchors`` (offsets from the image centre, in
  fractions of the side) plus a uniform jitter of at most ``anchor_jitter`` on each axis; the
  object is then moved, if needed, to lie inside the image.

Two-object scenes keep the default placement and sizes; their colours come from the palette.
`vitlens_server.data.captions.CRISP_ATTRIBUTES` is the setting matched to the captions' names
and thresholds. This module draws; it knows nothing of captions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from vitlens_server.data.shapes import SceneObject, object_patch

__all__ = ["CrispAttributes", "crisp_colour_candidates", "crisp_geometry", "unit_shape"]

_UNIT_PX = 100.0  # bounding radius of the raster that measures a unit shape


@dataclass(frozen=True)
class CrispAttributes:
    """Separated attribute values for single objects (see the module docstring).

    Attributes:
        palette: RGB colours an object's base colour is drawn from (jitter added).
        palette_jitter: largest change per channel (0-255 units) of a drawn palette colour.
        area_bands: ranges of the visible area, in fractions of the image, one drawn per object.
        anchors: (dx, dy) targets of the mask centroid, offsets from the image centre in
            fractions of the side.
        anchor_jitter: largest change of the target on each axis, in fractions of the side.
    """

    palette: tuple[tuple[int, int, int], ...]
    palette_jitter: int
    area_bands: tuple[tuple[float, float], ...]
    anchors: tuple[tuple[float, float], ...]
    anchor_jitter: float

    def __post_init__(self) -> None:
        if not self.palette or not self.area_bands or not self.anchors:
            raise ValueError("palette, area_bands and anchors must not be empty")
        if not all(0 < low <= high < 0.5 for low, high in self.area_bands):
            raise ValueError(f"area bands must satisfy 0 < low <= high < 0.5: {self.area_bands}")


@functools.cache
def unit_shape(label: int, rotation_deg: int) -> tuple[float, float, float]:
    """``(area, dx, dy)`` of shape ``label`` with bounding radius 1 rotated by ``rotation_deg``
    degrees: its rasterised area and the offset of its centroid from its centre."""
    size = int(2 * _UNIT_PX) + 4
    centre = size / 2
    obj = SceneObject(label, (centre, centre), _UNIT_PX, math.radians(rotation_deg), (0, 0, 0))
    rows, cols, patch = object_patch(obj, size)  # patch: (h, w) bool
    ys, xs = np.nonzero(patch)
    dx = (xs.mean() + cols.start + 0.5 - centre) / _UNIT_PX
    dy = (ys.mean() + rows.start + 0.5 - centre) / _UNIT_PX
    return float(patch.sum() / _UNIT_PX**2), float(dx), float(dy)


def crisp_geometry(
    rng: np.random.Generator, crisp: CrispAttributes, label: int, size: int
) -> tuple[float, float, float, float]:
    """``(cx, cy, radius, rotation)`` in pixels and radians of a crisp single object."""
    low, high = crisp.area_bands[int(rng.integers(len(crisp.area_bands)))]
    area = rng.uniform(low, high)
    ax, ay = crisp.anchors[int(rng.integers(len(crisp.anchors)))]
    jx, jy = rng.uniform(-crisp.anchor_jitter, crisp.anchor_jitter, 2)
    rotation = float(rng.uniform(0.0, 2 * math.pi))
    unit_area, dx, dy = unit_shape(label, round(math.degrees(rotation)) % 360)
    radius = math.sqrt(area / unit_area) * size
    # Centre so that the centroid lands on the target, then inside the image.
    cx = min(max((0.5 + ax + jx) * size - dx * radius, radius), size - radius)
    cy = min(max((0.5 + ay + jy) * size - dy * radius, radius), size - radius)
    return float(cx), float(cy), float(radius), rotation


def crisp_colour_candidates(rng: np.random.Generator, crisp: CrispAttributes) -> np.ndarray:
    """(P, 3) int candidate colours: the palette in a seeded order, each jittered."""
    palette = np.asarray(crisp.palette, dtype=np.int64)[rng.permutation(len(crisp.palette))]
    jitter = rng.integers(-crisp.palette_jitter, crisp.palette_jitter + 1, palette.shape)
    return np.clip(palette + jitter, 0, 255)
