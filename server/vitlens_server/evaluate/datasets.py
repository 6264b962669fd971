"""Evaluation datasets: generated scenes, server folders (VOC or ImageFolder), inline samples.

Every dataset yields `Sample`s: an RGB image, its class labels (the first is the one scored) and,
where the data has them, one ground-truth mask per label. Server folders are opened only under
the roots the operator allowed (``vitlens serve --dataset-root``): paths are resolved (``..`` and
symlinks followed) before the check, and every file read is checked again, so neither a crafted
path nor a symlink inside an allowed folder can make the server read elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vitlens_server.data import render_scene, split_seeds
from vitlens_server.data.voc import VOCDataset
from vitlens_server.errors import InvalidArgument, NotFound, PermissionDenied

__all__ = [
    "FolderDataset",
    "Sample",
    "SyntheticDataset",
    "VOCFolder",
    "open_server_path",
    "parse_synthetic",
    "resolve_allowed",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True, eq=False)
class Sample:
    """One evaluation sample.

    Attributes:
        id: a name for reports.
        image: (H, W, 3) RGB, uint8 or float32 in [0, 1] (decoded uploads stay as decoded);
            any size: the runner resizes it to the model's input as uploads are resized.
        labels: class indices; ``labels[0]`` is the scored object's class.
        masks: (K, H, W) bool, one mask per label, or None when the data has no masks.
    """

    id: str
    image: np.ndarray
    labels: tuple[int, ...]
    masks: np.ndarray | None = None


class SyntheticDataset:
    """Held-out generated scenes (`vitlens_server.data`), with exact masks."""

    def __init__(self, count: int, seed: int = 0, two_object: bool = False) -> None:
        self.seeds = split_seeds("test", count, base_seed=seed)
        self.two_object = two_object
        self.name = f"synthetic:{count}:{seed}{':two_object' if two_object else ''}"

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> Sample:
        scene = render_scene(self.seeds[index], two_object=self.two_object)
        return Sample(f"scene_{scene.seed}", scene.image, scene.labels, scene.masks)


def parse_synthetic(text: str) -> SyntheticDataset:
    """``synthetic:N[:seed][:two_object]`` (the ``synthetic:`` prefix is optional)."""
    parts = text.removeprefix("synthetic:").split(":")
    two_object = parts[-1] == "two_object"
    if two_object:
        parts = parts[:-1]
    try:
        count = int(parts[0])
        seed = int(parts[1]) if len(parts) > 1 else 0
        if len(parts) > 2 or count < 1 or seed < 0:
            raise ValueError
    except ValueError:
        raise InvalidArgument(
            f"dataset.synthetic must be N[:seed][:two_object] with N ≥ 1, seed ≥ 0; got {text!r}"
        ) from None
    return SyntheticDataset(count, seed, two_object)


def resolve_allowed(path: str | Path, roots: Sequence[Path]) -> Path:
    """``path`` resolved, if it lies under one of ``roots``; else PERMISSION_DENIED."""
    if not roots:
        raise PermissionDenied(
            "this server allows no dataset folders; its operator can allow some with --dataset-root"
        )
    candidate = Path(path)
    if not candidate.is_absolute():
        raise InvalidArgument(f"dataset.server_path must be an absolute path; got {str(path)!r}")
    resolved = candidate.resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    raise PermissionDenied(
        f"{str(path)!r} is outside the dataset folders this server allows "
        f"({', '.join(str(r) for r in roots)})"
    )


class VOCFolder:
    """A Pascal VOC segmentation folder: each image scored on its largest class, with masks."""

    def __init__(self, root: Path, roots: Sequence[Path], split: str = "val") -> None:
        self._roots = roots
        self._voc = VOCDataset(root, split)
        self.labels = self._voc.labels
        self.name = f"voc:{root}:{split}"

    def __len__(self) -> int:
        return len(self._voc)

    def __getitem__(self, index: int) -> Sample:
        name = self._voc.ids[index]
        resolve_allowed(self._voc.root / "JPEGImages" / f"{name}.jpg", self._roots)
        resolve_allowed(self._voc.root / "SegmentationClass" / f"{name}.png", self._roots)
        sample = self._voc[index]
        masks = np.stack([sample.class_mask == label + 1 for label in sample.labels])
        return Sample(name, sample.image, sample.labels, masks)


class FolderDataset:
    """ImageFolder layout: ``root/<class name>/<image>``; class names must be model labels."""

    def __init__(self, root: Path, roots: Sequence[Path], labels: Sequence[str]) -> None:
        self._roots = roots
        index = {label: i for i, label in enumerate(labels)}
        self.items: list[tuple[Path, int]] = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if folder.name not in index:
                raise InvalidArgument(
                    f"folder {folder.name!r} of {root} is not a label of the model; class "
                    "folders must be named after the model's labels"
                )
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            self.items += [(f, index[folder.name]) for f in files]
        if not self.items:
            raise InvalidArgument(f"{root} holds no images in class folders")
        self.name = f"folder:{root}"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        path, label = self.items[index]
        resolved = resolve_allowed(path, self._roots)  # a symlink may point elsewhere
        with Image.open(resolved) as image:
            pixels = np.asarray(image.convert("RGB"))
        return Sample(f"{path.parent.name}/{path.name}", pixels, (label,))


def open_server_path(
    path: str, roots: Sequence[Path], labels: Sequence[str]
) -> VOCFolder | FolderDataset:
    """A server folder as a dataset: VOC layout if it has ``ImageSets``, else ImageFolder."""
    root = resolve_allowed(path, roots)
    if not root.is_dir():
        raise NotFound(f"dataset folder {path!r} does not exist on the server")
    if (root / "ImageSets" / "Segmentation").is_dir():
        return VOCFolder(root, roots)
    return FolderDataset(root, roots, labels)
