"""Scenes as a Pascal VOC segmentation folder, and a reader for that layout (ours or VOC2012's).

Layout under ``root``::

    JPEGImages/<id>.jpg               RGB image (quality 95, no chroma subsampling)
    SegmentationClass/<id>.png        palette PNG: 0 background, class index + 1, 255 void
    SegmentationObject/<id>.png       palette PNG: 0 background, instance 1..K, 255 void
    ImageSets/Segmentation/<split>.txt  ids, one per line
    labels.txt                        class names, one per line, in index order (vitlens only)

Masks use VOC's colour palette, so VOC tools show them as they show VOC's own. A scene's id is
``vitlens_<seed>`` (``vitlens_pair_<seed>`` for two-object scenes), zero-padded to 6 digits, so
exports of different seeds merge into one folder without clashes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vitlens_server.data.scenes import CLASSES, SceneConfig, render_scene, split_seeds

__all__ = ["VOC_CLASSES", "VOCDataset", "VOCSample", "export_voc", "scene_id", "voc_palette"]

# Pascal VOC's 20 object classes, in their standard order (mask value = index + 1).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

VOID = 255  # VOC's "ignore" value, on object borders and difficult regions
JPEG_QUALITY = 95


def voc_palette() -> list[int]:
    """VOC's 256-colour palette, flat: [r0, g0, b0, r1, ...]; index 255 is (224, 224, 192)."""
    palette = []
    for index in range(256):
        rgb = [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
        palette.extend(rgb)
    return palette


_PALETTE = voc_palette()


def scene_id(seed: int, *, two_object: bool = False) -> str:
    """The VOC id of scene ``seed``, e.g. ``vitlens_000123``."""
    return f"vitlens_{'pair_' if two_object else ''}{seed:06d}"


def export_voc(
    root: Path,
    count: int,
    *,
    seed: int = 0,
    split: str = "val",
    two_object: bool = False,
    config: SceneConfig | None = None,
) -> Path:
    """Write ``count`` scenes of ``split`` (seeds ``split_seeds(split, count, base_seed=seed)``).

    Creates the folders as needed, adds the new ids to ``ImageSets/Segmentation/<split>.txt``
    (keeping the ids already listed) and writes ``labels.txt``; a ``labels.txt`` naming other
    classes is a ValueError, since one folder holds one label set. ``config`` defaults to
    ``SceneConfig()``; one folder should hold scenes of one config, since ids name seeds only.

    Returns:
        ``root``.
    """
    root, config = Path(root), config or SceneConfig()
    labels_file = root / "labels.txt"
    names = "\n".join(CLASSES) + "\n"
    if labels_file.exists() and labels_file.read_text() != names:
        raise ValueError(f"{labels_file} lists other classes than vitlens' {list(CLASSES)}")
    folders = {
        name: root / name for name in ("JPEGImages", "SegmentationClass", "SegmentationObject")
    }
    sets = root / "ImageSets" / "Segmentation"
    for folder in (*folders.values(), sets):
        folder.mkdir(parents=True, exist_ok=True)
    labels_file.write_text(names)

    ids = []
    for scene_seed in split_seeds(split, count, base_seed=seed):
        scene = render_scene(scene_seed, two_object=two_object, config=config)
        name = scene_id(scene_seed, two_object=two_object)
        class_mask = np.zeros(scene.image.shape[:2], dtype=np.uint8)  # (H, W)
        object_mask = np.zeros_like(class_mask)
        for instance, (label, mask) in enumerate(zip(scene.labels, scene.masks, strict=True), 1):
            class_mask[mask] = label + 1
            object_mask[mask] = instance
        Image.fromarray(scene.image).save(
            folders["JPEGImages"] / f"{name}.jpg", quality=JPEG_QUALITY, subsampling=0
        )
        _save_indexed(class_mask, folders["SegmentationClass"] / f"{name}.png")
        _save_indexed(object_mask, folders["SegmentationObject"] / f"{name}.png")
        ids.append(name)

    split_file = sets / f"{split}.txt"
    listed = split_file.read_text().split() if split_file.exists() else []
    known = set(listed)
    listed += [name for name in ids if name not in known]
    split_file.write_text("".join(f"{name}\n" for name in listed))
    return root


def _save_indexed(values: np.ndarray, path: Path) -> None:
    """Save (H, W) uint8 ``values`` as a palette PNG with VOC's colours."""
    image = Image.frombytes("P", (values.shape[1], values.shape[0]), values.tobytes())
    image.putpalette(_PALETTE)
    image.save(path)


@dataclass(frozen=True, eq=False)
class VOCSample:
    """One image of a VOC folder.

    Attributes:
        id: the image's id.
        image: (H, W, 3) uint8 RGB.
        class_mask: (H, W) uint8: 0 background, class index + 1, 255 void (kept as is).
        object_mask: (H, W) uint8 instances (0 background, 255 void), or None without one.
        labels: 0-based class indices present in ``class_mask``, largest pixel area first.
    """

    id: str
    image: np.ndarray
    class_mask: np.ndarray
    object_mask: np.ndarray | None
    labels: tuple[int, ...]


class VOCDataset:
    """The segmentation images of a VOC folder's split: vitlens' export or a real VOC2012.

    Args:
        root: the folder holding ``JPEGImages``, ``SegmentationClass`` and ``ImageSets``.
        split: which ``ImageSets/Segmentation/<split>.txt`` to read.
        labels: class names by index; default ``root/labels.txt`` if it exists, else
            `VOC_CLASSES`.
    """

    def __init__(self, root: Path, split: str = "val", labels: Sequence[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"VOC root {self.root} is not a directory")
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"VOC split file {split_file} not found")
        self.split = split
        self.ids: tuple[str, ...] = tuple(split_file.read_text().split())
        if labels is None:
            labels_file = self.root / "labels.txt"
            labels = labels_file.read_text().split() if labels_file.is_file() else VOC_CLASSES
        self.labels: tuple[str, ...] = tuple(labels)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> VOCSample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        name = self.ids[index]
        image = np.asarray(_open(self.root / "JPEGImages" / f"{name}.jpg").convert("RGB"))
        class_mask = self._read_mask(self.root / "SegmentationClass" / f"{name}.png", image)
        object_path = self.root / "SegmentationObject" / f"{name}.png"
        object_mask = self._read_mask(object_path, image) if object_path.is_file() else None

        counts = np.bincount(class_mask.ravel(), minlength=256)  # (256,) pixels per value
        counts[[0, VOID]] = 0
        if counts[len(self.labels) + 1 :].any():
            bad = int(np.flatnonzero(counts[len(self.labels) + 1 :])[0]) + len(self.labels) + 1
            raise ValueError(
                f"{name}: class mask value {bad} is beyond the {len(self.labels)} labels"
            )
        present = np.flatnonzero(counts)
        order = present[np.argsort(-counts[present], kind="stable")]  # ties: lower class first
        labels = tuple(int(value) - 1 for value in order)
        return VOCSample(name, image, class_mask, object_mask, labels)

    @staticmethod
    def _read_mask(path: Path, image: np.ndarray) -> np.ndarray:
        mask = _open(path)
        if mask.mode not in ("P", "L"):
            raise ValueError(
                f"{path}: expected an indexed (P) or greyscale (L) PNG, got {mask.mode}"
            )
        values = np.asarray(mask)  # (H, W) uint8 palette indices
        if values.shape != image.shape[:2]:
            raise ValueError(
                f"{path}: mask is {values.shape[1]}x{values.shape[0]} but the image is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        return values


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with Image.open(path) as image:
        return image.copy()  # decoded, and independent of the closed file
