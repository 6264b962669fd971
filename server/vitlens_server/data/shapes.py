"""The eight object shapes of vitlens' scenes, rasterised exactly on the pixel grid.

Every shape lives in a unit frame: centred on the origin and inside the unit circle (its
*bounding radius* is 1). An object scales that frame by its radius in pixels, rotates it and
moves it to its centre. A pixel belongs to the object when the pixel's centre (column + 0.5,
row + 0.5) lies inside the shape: hard edges, no anti-aliasing, so the pixels the generator paints
and `render_object_mask` are the same set.

Shapes are evaluated on the object's bounding box only, with row (h, 1) and column (1, w)
coordinate vectors broadcast against each other, so no work is spent on the rest of the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["CLASSES", "SceneObject", "object_patch", "render_object_mask"]

# Class index i of a scene's labels is CLASSES[i]; the demo model's logits use the same order.
CLASSES: tuple[str, ...] = (
    "disc",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "crescent",
)

RING_INNER = 0.55  # inner radius of the ring, relative to the outer one
CROSS_HALF_WIDTH = 1 / math.sqrt(10)  # arm width = 1/3 of the cross' span; arm corners on r = 1
CRESCENT_OFFSET = 0.45  # centre of the disc cut out of the crescent, along its rotation
CRESCENT_CUT = 0.8  # radius of that disc


@dataclass(frozen=True)
class SceneObject:
    """One painted object: everything needed to rasterise its mask again.

    Attributes:
        label: class index into `CLASSES`.
        centre: (x, y) in pixels; pixel (row i, column j) has its centre at (j + 0.5, i + 0.5).
        radius: bounding radius in pixels: every pixel of the object is within it of `centre`.
        rotation: radians, applied to the unit shape (x right, y down).
        colour: base RGB fill; a shading (flat, gradient or stripes) varies its brightness.
    """

    label: int
    centre: tuple[float, float]
    radius: float
    rotation: float
    colour: tuple[int, int, int]

    @property
    def name(self) -> str:
        return CLASSES[self.label]


# A rasteriser takes unit-frame coordinates x (1, w) and y (h, 1), already centred and divided by
# the radius, plus the rotation, and returns the (h, w) bool inside test.
Rasteriser = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def _half_plane_count(
    x: np.ndarray, y: np.ndarray, normals: np.ndarray, offset: float
) -> np.ndarray:
    """How many of the half-planes ``p · n_k <= offset`` hold at each pixel: (h, w) int."""
    count = np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=np.uint8)
    for angle in normals:
        count += x * math.cos(angle) + y * math.sin(angle) <= offset
    return count


def _regular_polygon(sides: int) -> Rasteriser:
    """A regular polygon with its vertices on the unit circle (one at angle ``rotation``)."""
    normals = (np.arange(sides) + 0.5) * (2 * math.pi / sides)
    inradius = math.cos(math.pi / sides)

    def inside(x: np.ndarray, y: np.ndarray, rotation: float) -> np.ndarray:
        return _half_plane_count(x, y, normals + rotation, inradius) == sides

    return inside


def _disc(x: np.ndarray, y: np.ndarray, rotation: float) -> np.ndarray:
    return x * x + y * y <= 1.0


def _ring(x: np.ndarray, y: np.ndarray, rotation: float) -> np.ndarray:
    rho2 = x * x + y * y
    return (rho2 <= 1.0) & (rho2 >= RING_INNER**2)


def _star(x: np.ndarray, y: np.ndarray, rotation: float) -> np.ndarray:
    # A filled pentagram: the line from tip k to tip k + 2 has its normal towards tip k + 1, at
    # distance cos 72° from the centre. The centre pentagon is inside all five lines, each spike
    # is outside exactly one, the notches between spikes are outside two.
    normals = rotation + np.arange(5) * (2 * math.pi / 5)
    return _half_plane_count(x, y, normals, math.cos(2 * math.pi / 5)) >= 4


def _cross(x: np.ndarray, y: np.ndarray, rotation: float) -> np.ndarray:
    cos, sin = math.cos(rotation), math.sin(rotation)
    u = np.abs(x * cos + y * sin)  # (h, w) along one arm
    v = np.abs(y * cos - x * sin)  # (h, w) along the other
    half_length = math.sqrt(1 - CROSS_HALF_WIDTH**2)
    w = CROSS_HALF_WIDTH
    return ((u <= half_length) & (v <= w)) | ((u <= w) & (v <= half_length))


def _crescent(x: np.ndarray, y: np.ndarray, rotation: float) -> np.ndarray:
    cx = CRESCENT_OFFSET * math.cos(rotation)
    cy = CRESCENT_OFFSET * math.sin(rotation)
    return (x * x + y * y <= 1.0) & ((x - cx) ** 2 + (y - cy) ** 2 > CRESCENT_CUT**2)


_RASTERISERS: dict[str, Rasteriser] = {
    "disc": _disc,
    "square": _regular_polygon(4),
    "triangle": _regular_polygon(3),
    "star": _star,
    "cross": _cross,
    "ring": _ring,
    "hexagon": _regular_polygon(6),
    "crescent": _crescent,
}
if set(_RASTERISERS) != set(CLASSES):  # pragma: no cover - guards edits to CLASSES
    raise ImportError(f"shapes {sorted(_RASTERISERS)} do not match classes {sorted(CLASSES)}")


def object_patch(obj: SceneObject, size: int) -> tuple[slice, slice, np.ndarray]:
    """The object's bounding box, clipped to a ``size`` x ``size`` image, and its mask there.

    Returns:
        ``(rows, cols, mask)``: slices of the image and the (h, w) bool mask of the object on
        ``image[rows, cols]``; h or w is 0 when the object lies outside the image.
    """
    cx, cy = obj.centre
    r = obj.radius
    # Pixels whose centre can be within r of the object's centre: j + 0.5 in [cx - r, cx + r].
    x0 = max(math.ceil(cx - r - 0.5), 0)
    x1 = min(math.floor(cx + r - 0.5) + 1, size)
    y0 = max(math.ceil(cy - r - 0.5), 0)
    y1 = min(math.floor(cy + r - 0.5) + 1, size)
    x1, y1 = max(x1, x0), max(y1, y0)
    x = ((np.arange(x0, x1) + 0.5 - cx) / r)[None, :]  # (1, w)
    y = ((np.arange(y0, y1) + 0.5 - cy) / r)[:, None]  # (h, 1)
    mask = _RASTERISERS[obj.name](x, y, obj.rotation)
    return slice(y0, y1), slice(x0, x1), mask


def render_object_mask(obj: SceneObject, size: int) -> np.ndarray:
    """The (size, size) bool mask of ``obj`` alone: exactly the pixels the generator paints."""
    rows, cols, patch = object_patch(obj, size)
    mask = np.zeros((size, size), dtype=bool)
    mask[rows, cols] = patch
    return mask
