"""Seeded synthetic scenes with exact object masks: vitlens' ground truth for explanations.

A scene is a textured, cluttered background with one object (or up to `MAX_OBJECTS` of different
classes) of the eight `CLASSES` painted on top. Everything is drawn from
``np.random.default_rng(seed)`` in a fixed order, so a seed names one scene: the same seed gives
byte-identical images and masks in any process.

The background carries no information about the class, by construction: it is drawn *before*
the class, from the same distribution for every class (low-frequency colour noise, a gradient or
stripes, then clutter: line segments, dots, small irregular blobs, thin open arcs, none of them
one of the eight shapes). Objects are painted after the clutter, so clutter never occludes them,
with hard edges, exactly on the pixels of `render_object_mask`. Their colour is independent of the
class and differs in luminance from the background under them by at least
`SceneConfig.min_contrast`; a brightness shading (flat, gradient or stripes) textures them inside
their mask only.

Scenes of several objects place them with disjoint bounding circles (retrying positions), so
their masks do not overlap; ``labels[0]`` is the main object. Two objects are the explanation
tests' scenes; three and four (``count=``) are detection scenes, drawn smaller
(`SceneConfig.group_radius`).

``SceneConfig(crisp=...)`` (off by default; `vitlens_server.data.crisp`) draws colours from a
palette, and single objects' sizes and positions from separated values instead: scenes whose
captions sit far from every boundary. The default draws, bytes and seeds are unaffected by it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vitlens_server.data.backgrounds import draw_background
from vitlens_server.data.crisp import CrispAttributes, crisp_colour_candidates, crisp_geometry
from vitlens_server.data.shapes import CLASSES, SceneObject, object_patch

__all__ = [
    "CLASSES",
    "MAX_OBJECTS",
    "SPLIT_OFFSETS",
    "SPLIT_STRIDE",
    "Scene",
    "SceneConfig",
    "render_background",
    "render_batch",
    "render_scene",
    "split_seeds",
]

# Seeds of the splits: train from 0, val from 10 M, test from 20 M, each range 10 M seeds wide.
SPLIT_STRIDE = 10_000_000
SPLIT_OFFSETS = {"train": 0, "val": SPLIT_STRIDE, "test": 2 * SPLIT_STRIDE}

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luminance weights
_COLOUR_TRIES = 16  # candidate colours per object; the first with enough contrast is used
_PAIR_TRIES = 64  # candidate placements for several objects before a corner/quadrant fallback
MAX_OBJECTS = 4  # the most objects a scene holds


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. Lengths are fractions of the image side unless they say otherwise.

    Attributes:
        size: image side in pixels (square images).
        radius: range of an object's bounding radius in single-object scenes; at 224 px,
            0.12-0.30 is 27-67 px, so an object covers about 3 to 60 patches of 16 x 16.
        pair_radius: the same for two-object scenes, smaller so that both fit side by side.
        pair_gap: least gap between the two objects' bounding circles (and between any two of
            three or four).
        group_radius: the radius range of objects in scenes of three or four objects.
        noise_cells: range of the low-frequency colour-noise grid, cells per side.
        noise_std: spread of the grid's colours around the scene's base colour (0-255 units).
        pattern_amplitude: range of the strength of the background's gradient or stripes.
        stripe_period: range of the background stripes' period.
        clutter: range of the number of clutter items.
        min_contrast: least luminance difference (0-255 units) between an object's colour and
            the mean luminance of the background it covers; at most 63, which is always reachable.
        shading_amplitude: largest brightness swing of an object's shading (0-255 units).
        crisp: None (the default) for free colours, sizes and positions; else how objects'
            attributes are drawn from separated values (`CrispAttributes`): ``radius`` is then
            unused for single objects, and ``labels=`` keeps their area, not their radius.
    """

    size: int = 224
    radius: tuple[float, float] = (0.12, 0.30)
    pair_radius: tuple[float, float] = (0.11, 0.20)
    pair_gap: float = 0.02
    group_radius: tuple[float, float] = (0.08, 0.15)
    noise_cells: tuple[int, int] = (2, 6)
    noise_std: float = 50.0
    pattern_amplitude: tuple[float, float] = (8.0, 32.0)
    stripe_period: tuple[float, float] = (0.03, 0.15)
    clutter: tuple[int, int] = (16, 48)
    min_contrast: float = 60.0
    shading_amplitude: float = 24.0
    crisp: CrispAttributes | None = None

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError(f"size must be at least 32 pixels, got {self.size}")
        for name in ("radius", "pair_radius", "group_radius"):
            low, high = getattr(self, name)
            if not 0 < low <= high < 0.5:
                raise ValueError(f"{name} must satisfy 0 < low <= high < 0.5, got {(low, high)}")
        high = self.pair_radius[1]
        if (2 * high + self.pair_gap) > math.sqrt(2) * (1 - 2 * high):
            raise ValueError("pair_radius and pair_gap leave no room for two objects")
        if 2 * self.group_radius[1] + self.pair_gap > 0.5:
            raise ValueError("group_radius and pair_gap leave no room for four objects")
        if not 2 <= self.noise_cells[0] <= self.noise_cells[1]:
            raise ValueError(f"noise_cells must satisfy 2 <= low <= high, got {self.noise_cells}")
        if not 0 <= self.clutter[0] <= self.clutter[1]:
            raise ValueError(f"clutter must satisfy 0 <= low <= high, got {self.clutter}")
        if not 0 <= self.min_contrast <= 63:
            raise ValueError(f"min_contrast must be in [0, 63], got {self.min_contrast}")


@dataclass(frozen=True, eq=False)
class Scene:
    """One rendered scene.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        labels: class indices into `CLASSES`, one per object, in painting order; ``labels[0]``
            is the main object. Two objects always have different classes.
        masks: (K, H, W) bool, per object the pixels where it is painted and visible.
        objects: the objects' parameters; `render_object_mask` rasterises each one alone.
        seed: the seed it was rendered from.
    """

    image: np.ndarray
    labels: tuple[int, ...]
    masks: np.ndarray
    objects: tuple[SceneObject, ...]
    seed: int

    @property
    def label(self) -> int:
        """The main object's class index."""
        return self.labels[0]

    @property
    def mask(self) -> np.ndarray:
        """The main object's (H, W) bool mask."""
        return self.masks[0]


def render_background(seed: int, *, config: SceneConfig = SceneConfig()) -> np.ndarray:
    """The (H, W, 3) uint8 background and clutter of scene ``seed``, before any object.

    `render_scene` with the same seed and config equals it outside the objects' masks (with or
    without ``two_object``): an "object removed" counterpart of the scene.
    """
    return draw_background(np.random.default_rng(seed), config)


def render_scene(
    seed: int,
    *,
    two_object: bool = False,
    labels: Sequence[int] | None = None,
    config: SceneConfig = SceneConfig(),
    count: int | None = None,
) -> Scene:
    """Render scene ``seed``: deterministic, the same bytes in every process.

    Args:
        seed: the scene's seed (see `split_seeds` for held-out ranges).
        two_object: paint two objects of different classes instead of one (``count=2``).
        labels: force the classes (``count`` different ones) instead of drawing them; the
            seed's background, sizes, positions and rotations stay the same, so this swaps the
            class of an otherwise identical scene.
        config: drawing parameters.
        count: the number of objects, 1 to `MAX_OBJECTS`, of different classes; None: one, or
            two with ``two_object``. Scenes of one or two objects are the same bytes either way.
    """
    rng = np.random.default_rng(seed)
    image = draw_background(rng, config)  # (H, W, 3) uint8, drawn before anything about the class
    if count is None:
        count = 2 if two_object else 1
    elif two_object and count != 2:
        raise ValueError(f"two_object asks for 2 objects, count for {count}")
    if not 1 <= count <= MAX_OBJECTS:
        raise ValueError(f"scenes hold 1 to {MAX_OBJECTS} objects, not {count}")
    drawn = tuple(int(i) for i in rng.permutation(len(CLASSES))[:count])
    labels = drawn if labels is None else _check_labels(labels, count)
    size = config.size

    crisp = config.crisp
    objects = []
    full_masks = np.zeros((count, size, size), dtype=bool)  # (K, H, W) each object alone
    places = [None] * count if crisp is not None and count == 1 else _place(rng, config, count)
    for index, (label, place) in enumerate(zip(labels, places, strict=True)):
        if place is None:  # a crisp single object: geometry from separated values
            cx, cy, r, rotation = crisp_geometry(rng, crisp, label, size)
        else:
            (cx, cy, r), rotation = place, float(rng.uniform(0.0, 2 * math.pi))
        if crisp is None:
            candidates = rng.integers(0, 256, (_COLOUR_TRIES, 3))  # (T, 3) RGB
        else:
            candidates = crisp_colour_candidates(rng, crisp)  # (P, 3) RGB
        shading = rng.random(5)
        obj = SceneObject(label, (cx, cy), r, rotation, (0, 0, 0))
        rows, cols, patch = object_patch(obj, size)  # patch: (h, w) bool
        region = image[rows, cols]  # (h, w, 3) view
        colour = _pick_colour(candidates, _mean_luma(region, patch), config.min_contrast)
        obj = dataclasses.replace(obj, colour=colour)
        _paint(region, patch, obj, rows, cols, shading, config.shading_amplitude)
        full_masks[index, rows, cols] = patch
        objects.append(obj)

    masks = full_masks.copy()  # a later object hides what it covers of the earlier ones
    for index in range(count - 1):
        masks[index] &= ~full_masks[index + 1 :].any(axis=0)
    return Scene(image=image, labels=labels, masks=masks, objects=tuple(objects), seed=seed)


def render_batch(
    seeds: Sequence[int],
    *,
    two_object: bool = False,
    config: SceneConfig = SceneConfig(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render several scenes.

    Returns:
        ``(images, labels, masks)``: (B, H, W, 3) uint8, (B,) int64 main labels and (B, H, W)
        bool main-object masks.
    """
    size = config.size
    images = np.empty((len(seeds), size, size, 3), dtype=np.uint8)
    labels = np.empty(len(seeds), dtype=np.int64)
    masks = np.empty((len(seeds), size, size), dtype=bool)
    for i, seed in enumerate(seeds):
        scene = render_scene(seed, two_object=two_object, config=config)
        images[i], labels[i], masks[i] = scene.image, scene.label, scene.mask
    return images, labels, masks


def split_seeds(split: str, count: int, *, base_seed: int = 0) -> range:
    """The seeds of the first ``count`` scenes of ``split``: "train", "val" or "test".

    Split ``s`` uses seeds ``SPLIT_OFFSETS[s] + base_seed`` onwards and never leaves its
    `SPLIT_STRIDE`-wide block, so held-out seeds never overlap training seeds, whatever the
    ``base_seed`` of either.
    """
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_OFFSETS)}")
    if count < 0 or base_seed < 0 or base_seed + count > SPLIT_STRIDE:
        raise ValueError(
            f"need 0 <= base_seed and 0 <= count with base_seed + count <= {SPLIT_STRIDE:,}, "
            f"got base_seed={base_seed}, count={count}"
        )
    start = SPLIT_OFFSETS[split] + base_seed
    return range(start, start + count)


def _check_labels(labels: Sequence[int], count: int) -> tuple[int, ...]:
    labels = tuple(int(label) for label in labels)
    if len(labels) != count or len(set(labels)) != count:
        raise ValueError(f"labels must be {count} different class indices, got {labels}")
    if not all(0 <= label < len(CLASSES) for label in labels):
        raise ValueError(f"labels must be in [0, {len(CLASSES)}), got {labels}")
    return labels


def _place(rng: np.random.Generator, config: SceneConfig, count: int) -> list[tuple[float, ...]]:
    """``count`` (cx, cy, radius) in pixels, objects inside the image, bounding circles apart."""
    size = config.size
    low, high = (config.radius, config.pair_radius, config.group_radius)[min(count, 3) - 1]
    radii = rng.uniform(low, high, count) * size
    attempts = rng.random((_PAIR_TRIES if count > 1 else 1, count, 2))  # (T, K, xy) in [0, 1)
    centres = radii[None, :, None] + attempts * (size - 2 * radii)[None, :, None]  # (T, K, 2)
    if count > 1:
        gaps = centres[:, :, None] - centres[:, None, :]  # (T, K, K, 2)
        reach = radii[:, None] + radii[None, :] + config.pair_gap * size  # (K, K)
        close = np.hypot(gaps[..., 0], gaps[..., 1]) < reach  # (T, K, K)
        close[:, np.arange(count), np.arange(count)] = False
        apart = np.flatnonzero(~close.any(axis=(1, 2)))
        if apart.size:
            centres = centres[apart[:1]]
        elif count == 2:  # opposite corners of a random diagonal: always far enough
            corner = np.array([[radii[0], radii[0]], [size - radii[1], size - radii[1]]])
            if attempts[0, 0, 0] < 0.5:
                corner[:, 0] = size - corner[:, 0]
            centres = corner[None]
        else:  # one object per quadrant, centred in it: always far enough (see SceneConfig)
            quadrants = np.argsort(attempts[0, :, 0])[:count]  # a random quadrant per object
            centres = ((np.stack([quadrants % 2, quadrants // 2], axis=1) + 0.5) * size / 2)[None]
    return [(float(x), float(y), float(r)) for (x, y), r in zip(centres[0], radii, strict=True)]


def _mean_luma(region: np.ndarray, patch: np.ndarray) -> float | None:
    """Mean luminance of (h, w, 3) ``region`` where (h, w) ``patch`` holds; None if nowhere."""
    if not patch.any():
        return None
    # One channel at a time: contiguous gathers, and no BLAS (the same sums in every process).
    return sum(weight * float(region[..., c][patch].mean()) for c, weight in enumerate(_LUMA))


def _pick_colour(
    candidates: np.ndarray, background_luma: float | None, min_contrast: float
) -> tuple[int, int, int]:
    """The first candidate (T, 3) whose luminance is ``min_contrast`` away from the mean
    luminance of the background under the object; else the first, darkened or lightened."""
    if background_luma is None:
        return tuple(int(c) for c in candidates[0])
    luma = (candidates * _LUMA).sum(axis=1)  # (T,)
    good = np.flatnonzero(np.abs(luma - background_luma) >= min_contrast)
    if good.size:
        colour = candidates[good[0]]
    elif background_luma >= 128:  # luminance at most 64: at least 64 below the background
        colour = candidates[0] // 4
    else:  # luminance at least 191: at least 63 above the background
        colour = 255 - (255 - candidates[0]) // 4
    return tuple(int(c) for c in colour)


def _paint(
    region: np.ndarray,
    patch: np.ndarray,
    obj: SceneObject,
    rows: slice,
    cols: slice,
    params: np.ndarray,
    amplitude: float,
) -> None:
    """Paint ``obj`` on its (h, w, 3) bounding box ``region`` where (h, w) ``patch`` holds: its
    colour, flat or with a brightness gradient or stripes (``params``: 5 uniforms picking kind,
    angle, period, phase and strength)."""
    kind, angle, period, phase, strength = params
    if kind < 1 / 3:
        for c, value in enumerate(obj.colour):
            np.copyto(region[..., c], value, where=patch)
        return
    cx, cy = obj.centre
    x = (np.arange(cols.start, cols.stop, dtype=np.float32) + 0.5 - cx) / obj.radius  # (w,)
    y = (np.arange(rows.start, rows.stop, dtype=np.float32) + 0.5 - cy) / obj.radius  # (h,)
    angle *= 2 * math.pi
    shading = x[None, :] * math.cos(angle) + y[:, None] * math.sin(angle)  # (h, w) in [-1, 1]
    if kind >= 2 / 3:  # stripes instead of a gradient
        shading = np.sin(shading * (2 * math.pi / (0.3 + 0.5 * period)) + 2 * math.pi * phase)
    shading *= strength * amplitude
    for c, value in enumerate(obj.colour):  # channel by channel: contiguous (h, w) operations
        np.copyto(region[..., c], np.clip(shading + value, 0, 255).astype(np.uint8), where=patch)
