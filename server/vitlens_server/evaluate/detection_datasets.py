"""The datasets detectors are evaluated on: generated scenes, or a COCO folder on the server.

    synthetic_detections   ``synthetic_detection:N[:seed]``: held-out scenes of 1 to 4 objects
                           at the model's input size (square models; others get 224 px scenes,
                           resized like any image), classes matched to the model's by name
    open_coco_folder       a COCO instances folder under an allowed root — ``annotations.json``
                           + ``images/`` (the layout `data.coco.export_coco` writes), or COCO's
                           own ``annotations/instances_<split>.json`` + ``<split>/`` — read
                           through the same checks as VOC folders: every file resolved inside
                           the allowed roots before it is opened, malformed files refused by
                           name; categories matched to the model's labels by name

Both give `DetectionSample`s with the model's class indices.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vitlens_server.data import CLASSES
from vitlens_server.data.coco import ANNOTATIONS, IMAGES, COCODataset
from vitlens_server.data.voc import BadFile
from vitlens_server.errors import FailedPrecondition, InvalidArgument, NotFound, clip
from vitlens_server.evaluate.datasets import _allowed, _Files, _invalid, resolve_allowed
from vitlens_server.evaluate.detection_run import (
    DetectionSample,
    parse_synthetic_detection,
)

__all__ = ["COCOFolder", "open_coco_folder", "synthetic_detections"]

_SCENE_SIDE = 224  # scenes for models whose input is not square


class _Relabelled:
    """A dataset whose samples' labels are mapped through ``index`` (dataset → model)."""

    def __init__(self, dataset: Sequence[DetectionSample], index: np.ndarray) -> None:
        self._dataset, self._index = dataset, index

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, i: int) -> DetectionSample:
        sample = self._dataset[i]
        return DetectionSample(sample.id, sample.image, self._index[sample.labels], sample.masks)


def synthetic_detections(
    text: str, model: str, labels: Sequence[str], size: tuple[int, int]
) -> Sequence[DetectionSample]:
    """The scenes of ``synthetic_detection:N[:seed]``, labels as the model's indices."""
    height, width = size
    scenes = parse_synthetic_detection(text, height if height == width else _SCENE_SIDE)
    return _Relabelled(scenes, _model_index(CLASSES, labels, model, "the generated scenes"))


class COCOFolder:
    """A COCO folder's images as `DetectionSample`s (crowd regions dropped), with the model's
    class indices; a malformed image is INVALID_ARGUMENT naming it."""

    def __init__(self, coco: COCODataset, index: np.ndarray) -> None:
        self._coco, self._index = coco, index

    def __len__(self) -> int:
        return len(self._coco)

    def __getitem__(self, i: int) -> DetectionSample:
        try:
            sample = self._coco[i]
        except BadFile as err:
            raise _invalid(err, i) from None
        keep = ~sample.crowd
        return DetectionSample(
            f"coco_{sample.id}", sample.image, self._index[sample.labels[keep]], sample.masks[keep]
        )


def open_coco_folder(
    path: str, roots: Sequence[Path], labels: Sequence[str], *, max_pixels: int
) -> COCOFolder:
    """The COCO folder at ``path`` (``dataset.server_path``), checked against ``roots``.

    Raises:
        InvalidArgument: not a folder, no ``annotations.json``, a malformed one.
        PermissionDenied: the path, or a file it names, leaves ``roots``.
        NotFound: no such folder.
        FailedPrecondition: a category the model has no label for.
    """
    root = resolve_allowed(path, roots)
    try:
        is_dir = stat.S_ISDIR(root.stat().st_mode)
    except OSError:
        raise NotFound(
            f"dataset.server_path {clip(path)} does not exist on the server; give a folder under "
            f"{_allowed(roots)}"
        ) from None
    layout = _layout(root) if is_dir else None
    if layout is None:
        raise InvalidArgument(
            f"dataset.server_path {clip(path)} is not a COCO folder for detectors: it needs "
            f"{ANNOTATIONS} (COCO instances with segmentations) and the images it names under "
            f"{IMAGES}/, or COCO's annotations/instances_<split>.json and <split>/"
        )
    files = _Files(root, roots)
    annotations, images = layout
    try:
        coco = COCODataset(
            root, annotations=annotations, images=images, max_pixels=max_pixels, opener=files.open
        )
    except BadFile as err:
        raise _invalid(err) from None
    return COCOFolder(coco, _model_index(coco.categories, labels, "", f"{clip(path)}"))


def _layout(root: Path) -> tuple[str, str] | None:
    """(annotations JSON, images folder), relative to ``root``, of the layouts above; None if
    neither is there (several ``instances_*.json``: ambiguous, None too)."""
    if (root / ANNOTATIONS).is_file():
        return ANNOTATIONS, IMAGES
    found = sorted((root / "annotations").glob("instances_*.json"))
    if len(found) != 1:
        return None
    split = found[0].stem.removeprefix("instances_")
    return f"annotations/{found[0].name}", split


def _model_index(names: Sequence[str], labels: Sequence[str], model: str, what: str) -> np.ndarray:
    """(len(names),) int64: the model's index of each dataset class, matched by name."""
    index = {label: i for i, label in enumerate(labels)}
    missing = [name for name in names if name not in index]
    if missing:
        shown = ", ".join(clip(m) for m in missing[:8])
        raise FailedPrecondition(
            f"{what} hold classes the detector{f' {model!r}' if model else ''} has no label for "
            f"({shown}); its labels are ModelInfo.labels"
        )
    return np.array([index[name] for name in names], dtype=np.int64)
