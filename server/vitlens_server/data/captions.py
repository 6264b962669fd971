"""Captions of generated scenes, from their metadata: what a contrastive image-text model learns.

Every attribute is read from the scene itself, so a caption is true of the pixels:

- **shape**: the object's class name (`CLASSES`).
- **colour**: the scenes draw an object's base colour as a free RGB triple (not a discrete
  attribute), so it is named by the nearest colour of `COLOURS` in RGB (Euclidean distance).
  The shading on top of the base colour varies its brightness, not its hue.
- **position**: from the centroid of the object's visible mask, relative to the image centre
  (offsets in fractions of the side): ``centre`` when both offsets are under
  `CENTRE_FRACTION`, else the side of the larger offset: ``left``/``right``/``top``/``bottom``.
- **size**: ``small`` when the visible mask covers less than `LARGE_AREA_FRACTION` of the
  image (the median of single-object scenes), else ``large``.
- **relation** (two objects): the first object is ``left of``/``right of``/``above``/``below``
  the second, along the axis of the larger centroid offset between them.

`CRISP_ATTRIBUTES` (used by ``crisp_scene_config``) is the optional scene setting matched to
these names and thresholds: colours drawn from `COLOURS` (jitter of at most 12 per channel, far
under half the distance between two named colours), visible areas in 0.025-0.045 or 0.095-0.13
(either side of `LARGE_AREA_FRACTION`), centroids within 0.05 of the centre or of an anchor 0.27
off it (either side of `CENTRE_FRACTION`). Its captions are then true by a wide margin, not
by a few pixels: the exemplar CLIP trains and is evaluated on such scenes.

`scene_captions` gives several phrasings of a scene (for training) and `canonical_caption` one
(for retrieval evaluation). Each `Caption` also carries its *claims*, so a caption can be
checked against any scene (`Caption.true_of`): training uses that to treat every caption in a
batch that is true of an image as a positive of that image, not only its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from vitlens_server.data.crisp import CrispAttributes
from vitlens_server.data.scenes import Scene, SceneConfig

__all__ = [
    "CENTRE_FRACTION",
    "COLOURS",
    "CRISP_ATTRIBUTES",
    "CRISP_MIN_CONTRAST",
    "LARGE_AREA_FRACTION",
    "WHERE",
    "Caption",
    "ObjectFacts",
    "canonical_caption",
    "colour_name",
    "crisp_scene_config",
    "prompt",
    "relation",
    "scene_captions",
    "scene_facts",
    "with_article",
]

# Named colours and their RGB; an object's colour name is the nearest of them.
COLOURS: Mapping[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
    "red": (220, 30, 30),
    "orange": (240, 140, 20),
    "yellow": (235, 220, 40),
    "green": (40, 170, 50),
    "blue": (40, 70, 220),
    "purple": (140, 50, 180),
    "pink": (245, 140, 200),
}
_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_RGB = np.array(list(COLOURS.values()), dtype=np.float64)  # (10, 3)

CENTRE_FRACTION = 0.125  # |offset| under this on both axes: "centre"
LARGE_AREA_FRACTION = 0.08  # visible area at or above this fraction of the image: "large"

# Separated attribute values on both sides of the thresholds above (see the module docstring).
CRISP_ATTRIBUTES = CrispAttributes(
    palette=tuple(COLOURS.values()),
    palette_jitter=12,
    area_bands=((0.025, 0.045), (0.095, 0.13)),
    anchors=((0.0, 0.0), (-0.27, 0.0), (0.27, 0.0), (0.0, -0.27), (0.0, 0.27)),
    anchor_jitter=0.05,
)
CRISP_MIN_CONTRAST = 25.0

WHERE = {  # position name -> its phrase in captions
    "centre": "in the centre",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_AN = re.compile(r"\ba (?=[aeiou])")  # "a orange" -> "an orange"
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Phrasings of one object; {s} shape, {c} colour, {z} size, {w} where. The first is canonical.
_SINGLE = (
    ("a {z} {c} {s} {w}.", ("shape", "colour", "size", "position")),
    ("a photo of a {s}.", ("shape",)),
    ("a {s}.", ("shape",)),
    ("a {c} {s}.", ("shape", "colour")),
    ("a {z} {s}.", ("shape", "size")),
    ("a {s} {w}.", ("shape", "position")),
    ("a {c} {s} {w}.", ("shape", "colour", "position")),
    ("a photo of a {z} {c} {s}.", ("shape", "colour", "size")),
)


@dataclass(frozen=True)
class ObjectFacts:
    """What a caption can say about one object (see the module docstring)."""

    shape: str
    colour: str
    size: str
    position: str
    centroid: tuple[float, float]  # (x, y) in fractions of the image side

    def claims(self, keys: tuple[str, ...]) -> frozenset[tuple[str, str]]:
        return frozenset((key, getattr(self, key)) for key in keys)


@dataclass(frozen=True)
class Caption:
    """A caption and what it claims: per object a set of (attribute, value) pairs, and
    optionally that the first claimed object is ``relation`` (e.g. "left of") the second."""

    text: str
    objects: tuple[frozenset[tuple[str, str]], ...]
    relation: str | None = None

    def true_of(self, facts: tuple[ObjectFacts, ...]) -> bool:
        """Whether some assignment of distinct scene objects satisfies every claim."""
        if len(self.objects) == 1:
            return any(self.objects[0] <= f.claims(_KEYS) for f in facts)
        for a, b in ((0, 1), (1, 0)) if len(facts) == 2 else ():
            if not (self.objects[0] <= facts[a].claims(_KEYS)):
                continue
            if not (self.objects[1] <= facts[b].claims(_KEYS)):
                continue
            if self.relation is None or relation(facts[a], facts[b]) == self.relation:
                return True
        return False


_KEYS = ("shape", "colour", "size", "position")


def colour_name(rgb: tuple[int, int, int]) -> str:
    """The name of the `COLOURS` entry nearest to ``rgb`` (Euclidean in RGB)."""
    distance = ((_COLOUR_RGB - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1)  # (10,)
    return _COLOUR_NAMES[int(distance.argmin())]


def crisp_scene_config(size: int = 224) -> SceneConfig:
    """Scenes of side ``size`` px with `CRISP_ATTRIBUTES` and a luminance contrast of 25 (instead
    of 60, under which the mid-luminance named colours would hardly ever be drawn: they still
    differ from the background in hue), otherwise the default drawing."""
    return SceneConfig(size=size, min_contrast=CRISP_MIN_CONTRAST, crisp=CRISP_ATTRIBUTES)


def scene_facts(scene: Scene) -> tuple[ObjectFacts, ...]:
    """The facts of each object of ``scene``, in its painting order."""
    size = scene.image.shape[0]
    facts = []
    for obj, mask in zip(scene.objects, scene.masks, strict=True):  # mask: (H, W) bool
        rows, cols = np.nonzero(mask)
        if rows.size:  # pixel centres, in fractions of the side
            x, y = (cols.mean() + 0.5) / size, (rows.mean() + 0.5) / size
        else:  # pragma: no cover - objects always have visible pixels at these sizes
            x, y = obj.centre[0] / size, obj.centre[1] / size
        area = rows.size / (size * size)
        facts.append(
            ObjectFacts(
                shape=obj.name,
                colour=colour_name(obj.colour),
                size="large" if area >= LARGE_AREA_FRACTION else "small",
                position=_position(x - 0.5, y - 0.5),
                centroid=(float(x), float(y)),
            )
        )
    return tuple(facts)


def relation(first: ObjectFacts, second: ObjectFacts) -> str:
    """Where ``first`` is relative to ``second``: "left of", "right of", "above" or "below"."""
    dx = first.centroid[0] - second.centroid[0]
    dy = first.centroid[1] - second.centroid[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def with_article(text: str) -> str:
    """``text`` with "a" before a vowel made "an" ("a orange disc." -> "an orange disc.")."""
    return _AN.sub("an ", text)


def prompt(shape: str, template: str = "a photo of a {}.") -> str:
    """The zero-shot prompt of a shape name."""
    return template.format(shape)


def scene_captions(scene: Scene) -> tuple[Caption, ...]:
    """All phrasings of ``scene``; the first is `canonical_caption`."""
    facts = scene_facts(scene)
    if len(facts) == 1:
        return tuple(_single(facts[0], template, keys) for template, keys in _SINGLE)
    first, second = facts
    rel = relation(first, second)
    shape_colour = ("shape", "colour")
    captions = [
        _pair(first, second, rel, "a {c1} {s1} {r} a {c2} {s2}.", shape_colour),
        _pair(second, first, _INVERSE[rel], "a {c1} {s1} {r} a {c2} {s2}.", shape_colour),
        _pair(first, second, rel, "a {s1} {r} a {s2}.", ("shape",)),
        _pair(first, second, None, "a {s1} and a {s2}.", ("shape",)),
        _pair(second, first, None, "a {c1} {s1} and a {c2} {s2}.", shape_colour),
    ]
    for obj in facts:
        captions.append(_single(obj, "a photo of a {s}.", ("shape",)))
        captions.append(_single(obj, "a {s}.", ("shape",)))
        captions.append(_single(obj, "a {z} {c} {s}.", ("shape", "colour", "size")))
    return tuple(captions)


def canonical_caption(scene: Scene) -> Caption:
    """The one caption of ``scene`` used for retrieval: everything about each object for one
    object ("a large red star on the left."), colours, shapes and relation for two ("a red star
    left of a blue ring.")."""
    return scene_captions(scene)[0]


def _position(dx: float, dy: float) -> str:
    if max(abs(dx), abs(dy)) < CENTRE_FRACTION:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _single(obj: ObjectFacts, template: str, keys: tuple[str, ...]) -> Caption:
    text = template.format(s=obj.shape, c=obj.colour, z=obj.size, w=WHERE[obj.position])
    return Caption(_AN.sub("an ", text), (obj.claims(keys),))


def _pair(
    first: ObjectFacts, second: ObjectFacts, rel: str | None, template: str, keys: tuple[str, ...]
) -> Caption:
    text = template.format(
        s1=first.shape, c1=first.colour, s2=second.shape, c2=second.colour, r=rel
    )
    return Caption(_AN.sub("an ", text), (first.claims(keys), second.claims(keys)), rel)
