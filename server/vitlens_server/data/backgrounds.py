"""Scene backgrounds: low-frequency colour noise, a gradient or stripes, and clutter.

Nothing here depends on the class of the objects painted later: `draw_background` is the first
thing a scene draws from its random generator. Clutter (line segments, dots, small irregular
blobs, thin open arcs) is none of the eight object shapes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from vitlens_server.data.scenes import SceneConfig

__all__ = ["draw_background"]

# Clutter geometry, in fractions of the image side (dot radii in pixels).
_LINE_LENGTH = (0.04, 0.40)
_BLOB_RADIUS = (0.012, 0.045)
_ARC_RADIUS = (0.03, 0.14)
_DOT_RADIUS_PX = (1.0, 3.0)
_BLOB_VERTICES = 12  # at most; each blob uses 6 to 11


def draw_background(rng: np.random.Generator, config: SceneConfig) -> np.ndarray:
    """Colour noise, a gradient or stripes, then clutter: (H, W, 3) uint8.

    The float work happens on (H, W * 3) rows, with one scratch buffer: every operation is
    contiguous and no large temporary is allocated (fresh large arrays cost page faults).
    """
    size = config.size
    cells = int(rng.integers(config.noise_cells[0], config.noise_cells[1] + 1))
    base = rng.uniform(40.0, 215.0, 3)
    grid = base + rng.normal(0.0, config.noise_std, (cells + 2, cells + 2, 3))  # with a margin
    rows, scratch = _smooth_noise(grid.astype(np.float32), size)  # (H, W * 3) float32 each

    kind, angle, period, phase, strength = rng.random(5)
    tint = rng.uniform(-1.0, 1.0, 3)  # (3,) colour of the pattern
    if kind >= 1 / 3:
        low, high = config.pattern_amplitude
        tint = (tint * (low + (high - low) * strength)).astype(np.float32)
        cos, sin = math.cos(2 * math.pi * angle), math.sin(2 * math.pi * angle)
        coords = np.arange(size, dtype=np.float32) + 0.5  # (W,) = (H,) pixel centres
        # Both patterns are sums of products f(x) g(y), with the tint folded into f.
        if kind < 2 / 3:  # a linear gradient 2 (x cos + y sin) / size - (cos + sin)
            rows += _tinted(coords * (2 * cos / size) - (cos + sin), tint)[None, :]
            ys = coords * (2 * sin / size)  # (H,)
            np.multiply(ys[:, None], np.tile(tint, size)[None, :], out=scratch)
            rows += scratch
        else:  # stripes: sin(a x + c + b y) = sin(a x + c) cos(b y) + cos(a x + c) sin(b y)
            low, high = config.stripe_period
            frequency = 2 * math.pi / ((low + (high - low) * period) * size)
            a = coords * (frequency * cos) + 2 * math.pi * phase  # (W,)
            b = coords * (frequency * sin)  # (H,)
            np.multiply(np.cos(b)[:, None], _tinted(np.sin(a), tint)[None, :], out=scratch)
            rows += scratch
            np.multiply(np.sin(b)[:, None], _tinted(np.cos(a), tint)[None, :], out=scratch)
            rows += scratch
    np.clip(rows, 0, 255, out=rows)

    canvas = Image.fromarray(rows.astype(np.uint8).reshape(size, size, 3))
    _draw_clutter(ImageDraw.Draw(canvas), rng, config)
    return np.array(canvas)


def _smooth_noise(grid: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(g + 2, g + 2, 3) cell colours → (size, size * 3) rows of an image interpolating the
    inner g x g cells with a quadratic B-spline (smooth, without the plateaus of smoothsteps or
    the creases of linear interpolation), and a (size, size * 3) scratch buffer."""
    cells = grid.shape[0] - 2
    # Cell centres sit at integer positions; pixel centres span the inner cells 1 .. g.
    position = (np.arange(size) + 0.5) * (cells / size) + 0.5  # (size,) in (0.5, g + 0.5)
    nearest = np.floor(position + 0.5).astype(int)
    f = position - nearest  # (size,) in [-0.5, 0.5)
    weights = np.stack([0.5 * (0.5 - f) ** 2, 0.75 - f * f, 0.5 * (0.5 + f) ** 2])  # (3, size)
    weights = weights.astype(np.float32)
    first = nearest - 1  # (size,) first of the three cells each pixel blends
    lines = sum(grid[:, first + k] * weights[k][None, :, None] for k in range(3))  # (g+2, W, 3)
    lines = lines.reshape(cells + 2, size * 3)
    rows = np.take(lines, first, axis=0)  # (H, W * 3)
    rows *= weights[0][:, None]
    scratch = np.empty_like(rows)
    for k in (1, 2):
        np.take(lines, first + k, axis=0, out=scratch)
        scratch *= weights[k][:, None]
        rows += scratch
    return rows, scratch


def _tinted(values: np.ndarray, tint: np.ndarray) -> np.ndarray:
    """(W,) values times a (3,) tint, as one (W * 3,) row of an (H, W, 3) image."""
    return (values[:, None] * tint).ravel()


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, config: SceneConfig) -> None:
    """Line segments, dots, irregular blobs and thin open arcs, their geometry drawn up front."""
    size = config.size
    count = int(rng.integers(config.clutter[0], config.clutter[1] + 1))
    kinds = rng.integers(0, 4, count).tolist()
    u = rng.random((6, count))  # (6, N) uniforms: position, size, and three per kind
    colours = [tuple(c) for c in rng.integers(0, 256, (count, 3)).tolist()]
    blob_radii = rng.uniform(0.45, 1.0, (count, _BLOB_VERTICES))
    blob_gaps = rng.uniform(0.5, 1.5, (count, _BLOB_VERTICES))

    x, y = u[0] * size, u[1] * size  # (N,) each
    # Lines: length and angle; dots and arcs: radius; blobs: vertices at uneven angles and radii.
    length, angle = (_LINE_LENGTH[0] + (_LINE_LENGTH[1] - _LINE_LENGTH[0]) * u[2]) * size, u[3]
    ends = np.stack(
        [x + length * np.cos(2 * math.pi * angle), y + length * np.sin(2 * math.pi * angle)]
    )
    dot_radius = _DOT_RADIUS_PX[0] + (_DOT_RADIUS_PX[1] - _DOT_RADIUS_PX[0]) * u[2]
    arc_radius = (_ARC_RADIUS[0] + (_ARC_RADIUS[1] - _ARC_RADIUS[0]) * u[2]) * size
    vertices = 6 + (6 * u[3]).astype(int)  # (N,) 6 to 11
    turns = np.cumsum(blob_gaps, axis=1)  # (N, V)
    turns = u[4][:, None] + turns / turns[np.arange(count), vertices - 1][:, None]
    radii = (
        blob_radii
        * ((_BLOB_RADIUS[0] + (_BLOB_RADIUS[1] - _BLOB_RADIUS[0]) * u[2]) * size)[:, None]
    )
    blobs = np.stack(  # (N, V, 2) vertex (x, y)
        [
            x[:, None] + radii * np.cos(2 * math.pi * turns),
            y[:, None] + radii * np.sin(2 * math.pi * turns),
        ],
        axis=2,
    )

    x, y, ends, u = x.tolist(), y.tolist(), ends.T.tolist(), u.T.tolist()
    for i, kind in enumerate(kinds):
        fill = colours[i]
        if kind == 0:  # a straight segment, 1 to 3 px wide
            draw.line([x[i], y[i], *ends[i]], fill=fill, width=1 + int(3 * u[i][4]))
        elif kind == 1:  # a dot
            r = float(dot_radius[i])
            draw.ellipse([x[i] - r, y[i] - r, x[i] + r, y[i] + r], fill=fill)
        elif kind == 2:  # a small irregular blob
            draw.polygon(blobs[i, : vertices[i]].ravel().tolist(), fill=fill)
        else:  # a thin open arc, 40 to 200 degrees
            r, start = float(arc_radius[i]), 360 * u[i][3]
            box = [x[i] - r, y[i] - r, x[i] + r, y[i] + r]
            draw.arc(box, start, start + 40 + 160 * u[i][4], fill=fill, width=1 + int(2 * u[i][5]))
