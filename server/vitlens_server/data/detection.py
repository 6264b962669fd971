"""Detection scenes: one to four objects of different classes, with boxes from their exact masks.

`detection_scene(seed)` is `render_scene` with a number of objects drawn from the seed (1 to
`MAX_OBJECTS`, equally likely), so a seed still names one scene. `scene_boxes` reads each
object's box off its visible mask — the tightest box around the pixels it is painted on — so a
box is exactly as true as the mask. `detection_batch` renders a batch for training in the target
format Hugging Face's DETR loss takes (normalised centre-size boxes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vitlens_server.data.scenes import MAX_OBJECTS, Scene, SceneConfig, render_scene

__all__ = [
    "DetectionBatch",
    "detection_batch",
    "detection_count",
    "detection_scene",
    "mask_boxes",
    "scene_boxes",
    "to_centre_size",
]

_COUNT_STREAM = 0xDE7  # the seed's stream for its object count, apart from the scene's own
_DEFAULT = SceneConfig()


def detection_count(seed: int) -> int:
    """The number of objects, 1 to `MAX_OBJECTS`, of detection scene ``seed``."""
    return int(np.random.default_rng((seed, _COUNT_STREAM)).integers(1, MAX_OBJECTS + 1))


def detection_scene(seed: int, *, config: SceneConfig = _DEFAULT, most: int = MAX_OBJECTS) -> Scene:
    """Detection scene ``seed``: `render_scene` with `detection_count` objects, at most
    ``most`` (a training curriculum's cap; the held-out scenes are never capped)."""
    return render_scene(seed, count=min(detection_count(seed), most), config=config)


def scene_boxes(scene: Scene) -> np.ndarray:
    """(K, 4) float32 boxes (x1, y1, x2, y2) in pixels, one per object: `mask_boxes` of its
    visible masks."""
    return mask_boxes(scene.masks)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) bool masks → (K, 4) float32 boxes (x1, y1, x2, y2): the pixel edges of each
    mask (x2, y2 exclusive), so a one-pixel object is 1 x 1."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for index, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size:  # a fully hidden object keeps a zero box; disjoint placements never hide
            boxes[index] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def to_centre_size(boxes: np.ndarray, size: int) -> np.ndarray:
    """(K, 4) pixel (x1, y1, x2, y2) → (K, 4) (cx, cy, w, h) as fractions of the side ``size``."""
    x1, y1, x2, y2 = np.moveaxis(np.asarray(boxes, dtype=np.float32), -1, 0)
    return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1) / size


@dataclass(frozen=True)
class DetectionBatch:
    """Rendered detection scenes.

    Attributes:
        images: (B, S, S, 3) uint8.
        labels: per scene, its (K,) int64 class indices.
        boxes: per scene, its (K, 4) float32 pixel boxes (`scene_boxes`).
        scenes: the scenes themselves (masks included).
    """

    images: np.ndarray
    labels: tuple[np.ndarray, ...]
    boxes: tuple[np.ndarray, ...]
    scenes: tuple[Scene, ...]

    def targets(self) -> list[dict[str, np.ndarray]]:
        """DETR's training targets: per scene ``class_labels`` (K,) and ``boxes`` (K, 4)
        normalised (cx, cy, w, h)."""
        size = self.images.shape[1]
        return [
            {"class_labels": labels, "boxes": to_centre_size(boxes, size)}
            for labels, boxes in zip(self.labels, self.boxes, strict=True)
        ]


def detection_batch(
    seeds: Sequence[int], *, config: SceneConfig = _DEFAULT, most: int = MAX_OBJECTS
) -> DetectionBatch:
    """The detection scenes of ``seeds`` (at most ``most`` objects each), with their labels and
    boxes."""
    scenes = tuple(detection_scene(seed, config=config, most=most) for seed in seeds)
    return DetectionBatch(
        images=np.stack([scene.image for scene in scenes]),
        labels=tuple(np.asarray(scene.labels, dtype=np.int64) for scene in scenes),
        boxes=tuple(scene_boxes(scene) for scene in scenes),
        scenes=scenes,
    )
