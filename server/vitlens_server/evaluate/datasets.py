"""Evaluation datasets: generated scenes, server folders (VOC or ImageFolder), inline samples.

Every dataset yields `Sample`s: an RGB image, its class labels (the first is the one scored) and,
where the data has them, one ground-truth mask per label. Server folders are opened only under
the roots the operator allowed (``vitlens serve --dataset-root``): paths are resolved (``..`` and
symlinks followed) before the check, and every file read (images, masks, split lists,
``labels.txt``) is resolved and checked again, so neither a crafted path nor a symlink inside an
allowed folder can make the server read elsewhere.

Clients name these datasets, so everything about them is treated as hostile: a bad spec or path
is INVALID_ARGUMENT (or PERMISSION_DENIED, NOT_FOUND) with a message saying what to fix; client
strings are echoed quoted and cut to `ECHO_CHARS`; files are named relative to the dataset
folder, and nothing outside the allowed folders (a symlink's target, a file's contents) is ever
put in a message. Images are size-checked from their headers against ``max_pixels`` before any
pixel is decoded, as uploads are (`vitlens_server.imaging`).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from vitlens_server.config import DEFAULT_MAX_PIXELS
from vitlens_server.data import SPLIT_STRIDE, render_scene, split_seeds
from vitlens_server.data.voc import BadFile, MissingFile, VOCDataset, open_regular, read_image
from vitlens_server.errors import ECHO_CHARS, InvalidArgument, NotFound, PermissionDenied, clip, cut

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
MAX_PATH_BYTES = 4096  # Linux's PATH_MAX
MAX_NAME_BYTES = 255  # Linux's NAME_MAX: the longest path component
_SYNTHETIC_FORM = (
    "dataset.synthetic must be N[:seed][:two_object] (the 'synthetic:' prefix is optional), N "
    f"and seed whole numbers with 1 ≤ N and 0 ≤ seed, N + seed ≤ {SPLIT_STRIDE:,}"
)
_DIGITS = re.compile(r"[0-9]+")


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
    """Held-out generated scenes (`vitlens_server.data`), with exact masks.

    ``seed + count`` must stay within the test split's `SPLIT_STRIDE` seeds (a ValueError
    otherwise; `parse_synthetic` checks client specs first).
    """

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
    """``synthetic:N[:seed][:two_object]`` (the ``synthetic:`` prefix is optional).

    N and seed are plain decimal numbers (no sign, space or underscore) within the held-out seed
    range (``N + seed ≤ SPLIT_STRIDE``); anything else is INVALID_ARGUMENT naming the form.
    """
    parts = text.removeprefix("synthetic:").split(":")
    two_object = parts[-1] == "two_object"
    if two_object:
        parts = parts[:-1]
    if not 1 <= len(parts) <= 2 or not all(_DIGITS.fullmatch(part) for part in parts):
        raise InvalidArgument(f"{_SYNTHETIC_FORM}; got {clip(text)}")
    digits = len(str(SPLIT_STRIDE))
    if any(len(part.lstrip("0")) > digits for part in parts):  # before int(): 10**30 digits...
        raise InvalidArgument(f"{_SYNTHETIC_FORM}; got {clip(text)}, out of that range")
    count = int(parts[0])
    seed = int(parts[1]) if len(parts) > 1 else 0
    if count < 1 or count + seed > SPLIT_STRIDE:
        raise InvalidArgument(f"{_SYNTHETIC_FORM}; got N = {count:,}, seed = {seed:,}")
    return SyntheticDataset(count, seed, two_object)


def resolve_allowed(path: str | Path, roots: Sequence[Path]) -> Path:
    """``path`` resolved, if it lies under one of ``roots``; else PERMISSION_DENIED.

    ``path`` is the client's ``dataset.server_path``: an empty, relative or overlong path, or
    one with a NUL byte or text that is not valid Unicode, is INVALID_ARGUMENT. ``..`` and
    symlinks are resolved before the check, so neither escapes (PERMISSION_DENIED).
    """
    if not roots:
        raise PermissionDenied(
            "this server allows no dataset folders; its operator can allow some with --dataset-root"
        )
    text = os.fspath(path)
    _check_path_text(text, roots)
    candidate = Path(text)
    if not candidate.is_absolute():
        raise InvalidArgument(
            f"dataset.server_path must be an absolute path, under {_allowed(roots)}; got "
            f"{clip(text)}"
        )
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError):  # a symlink loop, or too long once links are followed
        raise InvalidArgument(
            f"dataset.server_path {clip(text)} cannot be resolved on the server (a symlink loop, "
            "or too long once symlinks are followed); give a plain folder path"
        ) from None
    if not _inside(resolved, _resolved_roots(roots)):
        raise PermissionDenied(
            f"dataset.server_path {clip(text)} is outside the dataset folders this server allows "
            f"({_allowed(roots)}); symlinks are followed before this check"
        )
    return resolved


def _check_path_text(text: str, roots: Sequence[Path]) -> None:
    """INVALID_ARGUMENT for path text no file system call should see."""
    fix = f"give the absolute path of a folder under {_allowed(roots)}"
    if not text:
        raise InvalidArgument(f"dataset.server_path is empty; {fix}")
    if "\x00" in text:
        raise InvalidArgument(f"dataset.server_path {clip(text)} holds a NUL byte; {fix}")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(
            f"dataset.server_path {clip(text)} is not valid Unicode text (a lone surrogate); {fix}"
        ) from None
    if len(data) > MAX_PATH_BYTES:
        raise InvalidArgument(
            f"dataset.server_path is {len(data):,} bytes long, above the {MAX_PATH_BYTES} bytes "
            f"a path may have ({clip(text)}); {fix}"
        )
    longest = max(text.split("/"), key=lambda part: len(part.encode("utf-8")))
    if len(longest.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidArgument(
            f"dataset.server_path has a {len(longest.encode('utf-8')):,}-byte component "
            f"({clip(longest)}), above the {MAX_NAME_BYTES} bytes a file name may have; {fix}"
        )


def _allowed(roots: Sequence[Path]) -> str:
    """The allowed roots, for a message (the operator's own paths, so not a client string)."""
    return cut(", ".join(str(r) for r in roots), 4 * ECHO_CHARS)


def _resolved_roots(roots: Sequence[Path]) -> tuple[Path, ...]:
    return tuple(Path(root).resolve() for root in roots)


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


class _Files:
    """The files of one dataset folder: each resolved (symlinks followed) and checked against
    the allowed roots just before it is opened, and named relative to the folder in messages."""

    def __init__(self, root: Path, roots: Sequence[Path]) -> None:
        self.root = root
        self._roots = _resolved_roots(roots)

    def name(self, path: Path) -> str:
        """``path`` relative to the dataset folder, as a message shows it."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.name

    def check(self, path: Path) -> Path:
        """``path`` resolved, if it stays inside the allowed roots; else PERMISSION_DENIED."""
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):
            raise InvalidArgument(
                f"{clip(self.name(path))} in the dataset folder cannot be resolved (a symlink "
                "loop?); fix or remove it"
            ) from None
        if not _inside(resolved, self._roots):
            raise PermissionDenied(
                f"{clip(self.name(path))} in the dataset folder is a symlink to a place outside "
                "the dataset folders this server allows; a dataset may only link within them"
            )
        return resolved

    def open(self, path: Path) -> BinaryIO:
        """``path`` checked, then opened; a symlink swapped in after the check is refused."""
        return open_regular(self.check(path), follow_symlinks=False)


def _invalid(err: BadFile, index: int | None = None) -> InvalidArgument:
    where = "" if index is None else f"sample {index} of the dataset: "
    if isinstance(err, MissingFile):
        return InvalidArgument(f"{where}{clip(err.file)} {err.reason} in the dataset folder")
    return InvalidArgument(f"{where}{clip(err.file)} {err.reason}; fix or remove it")


class VOCFolder:
    """A Pascal VOC segmentation folder: each image scored on its largest class, with masks.

    The folder's classes (``labels.txt``, else VOC's 20) are matched to the model's labels by
    name, so a folder may list its classes in any order; a sample showing a class the model
    does not have is refused by name.

    Object masks (``SegmentationObject``) are not read. Raises INVALID_ARGUMENT for a missing,
    empty or malformed split list or ``labels.txt``, and, when a sample is read, for a missing,
    corrupt or oversized image or mask, or one that marks no object.
    """

    def __init__(
        self,
        root: Path,
        roots: Sequence[Path],
        split: str = "val",
        *,
        model_labels: Sequence[str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        """``model_labels``: the served model's class names (None: the folder's own order)."""
        self._files = _Files(root, roots)
        split_file = f"ImageSets/Segmentation/{split}.txt"
        try:
            self._voc = VOCDataset(
                root, split, max_pixels=max_pixels, object_masks=False, opener=self._files.open
            )
        except MissingFile as err:
            if err.file != split_file:
                raise _invalid(err) from None
            raise InvalidArgument(
                f"the VOC dataset folder has no {split_file}: list the ids of the images to "
                "evaluate there, one per line (JPEGImages/<id>.jpg, SegmentationClass/<id>.png)"
            ) from None
        except BadFile as err:
            raise _invalid(err) from None
        if not self._voc.ids:
            raise InvalidArgument(
                f"{split_file} of the VOC dataset folder lists no image ids; list the ids of the "
                "images to evaluate, one per line"
            )
        self.labels = self._voc.labels
        index = {name: i for i, name in enumerate(model_labels or self.labels)}
        self._to_model = [index.get(name) for name in self.labels]  # folder class → model's
        self.name = f"voc:{root}:{split}"

    def __len__(self) -> int:
        return len(self._voc)

    def __getitem__(self, index: int) -> Sample:
        try:
            sample = self._voc[index]
        except BadFile as err:
            raise _invalid(err, index) from None
        if not sample.labels:
            raise InvalidArgument(
                f"sample {index} of the dataset: {clip(f'SegmentationClass/{sample.id}.png')} "
                "marks no object (only background and void); every evaluated image needs one"
            )
        masks = np.stack([sample.class_mask == label + 1 for label in sample.labels])
        labels = []
        for label in sample.labels:
            if self._to_model[label] is None:
                raise InvalidArgument(
                    f"sample {index} of the dataset: {clip(f'SegmentationClass/{sample.id}.png')} "
                    f"shows class {clip(self.labels[label], 60)}, which is not a label of the "
                    "model; evaluate it with a model that has the dataset's classes"
                )
            labels.append(self._to_model[label])
        return Sample(sample.id, sample.image, tuple(labels), masks)  # masks: (K, H, W)


class FolderDataset:
    """ImageFolder layout: ``root/<class name>/<image>``; class names must be model labels.

    Folders and files whose names start with ``.`` are skipped (``.ipynb_checkpoints``, macOS'
    ``._*`` files), as are files without an image suffix (`IMAGE_SUFFIXES`). Samples are named by
    their path relative to ``root``.
    """

    def __init__(
        self,
        root: Path,
        roots: Sequence[Path],
        labels: Sequence[str],
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self._files = _Files(root, roots)
        self._max_pixels = max_pixels
        index = {label: i for i, label in enumerate(labels)}
        model_labels = cut(", ".join(map(repr, labels)), ECHO_CHARS)
        layout = (
            "an ImageFolder dataset is <folder>/<label>/<image>, with one folder per model label "
            f"({model_labels}); a VOC dataset has ImageSets/Segmentation/val.txt"
        )
        self.items: list[tuple[Path, int]] = []
        folders = [entry for entry in _listing(root, self._files) if _is_dir(entry)]
        if not folders:
            raise InvalidArgument(f"the dataset folder holds no class folders: {layout}")
        for folder in folders:
            if folder.name not in index:
                raise InvalidArgument(
                    f"class folder {clip(folder.name)} of the dataset is not a label of the "
                    f"model: {layout}"
                )
            self._files.check(folder)  # a symlinked class folder must stay inside the roots
            files = [f for f in _listing(folder, self._files) if f.suffix.lower() in IMAGE_SUFFIXES]
            self.items += [(f, index[folder.name]) for f in files]
        if not self.items:
            names = cut(", ".join(repr(folder.name) for folder in folders), ECHO_CHARS)
            raise InvalidArgument(
                f"the class folders of the dataset ({names}) hold no images "
                f"({', '.join(IMAGE_SUFFIXES)})"
            )
        self.name = f"folder:{root}"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        path, label = self.items[index]
        name = self._files.name(path)
        try:
            with self._files.open(path) as handle:  # a symlink may point elsewhere
                pixels = read_image(handle, name, max_pixels=self._max_pixels)
        except BadFile as err:
            raise _invalid(err, index) from None
        except FileNotFoundError:
            raise InvalidArgument(
                f"sample {index} of the dataset: {clip(name)} was removed after the dataset "
                "was opened"
            ) from None
        except OSError as err:
            raise InvalidArgument(
                f"sample {index} of the dataset: {clip(name)} cannot be read "
                f"({err.strerror or type(err).__name__})"
            ) from None
        return Sample(name, pixels, (label,))


def _listing(folder: Path, files: _Files) -> list[Path]:
    """The entries of ``folder``, sorted, without hidden ones (names starting with ``.``)."""
    try:
        return sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))
    except OSError as err:
        where = "the dataset folder" if folder == files.root else clip(files.name(folder))
        raise InvalidArgument(
            f"{where} cannot be listed on the server ({err.strerror or type(err).__name__})"
        ) from None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a symlink loop, a name too long once followed: not a class folder
        return False


def open_server_path(
    path: str,
    roots: Sequence[Path],
    labels: Sequence[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> VOCFolder | FolderDataset:
    """A server folder as a dataset: VOC layout if it has ``ImageSets`` or ``JPEGImages``, else
    ImageFolder (class folders named after ``labels``, the model's).

    Args:
        path: the client's ``dataset.server_path``, checked by `resolve_allowed`.
        roots: the folders the operator allowed.
        labels: the model's class names.
        max_pixels: images with more pixels are refused from their header (INVALID_ARGUMENT).

    Raises:
        InvalidArgument: a malformed path, a path to a file, a malformed dataset.
        PermissionDenied: a path, or a symlink inside the folder, that leaves ``roots``.
        NotFound: no such folder under ``roots``.
    """
    root = resolve_allowed(path, roots)
    try:
        mode = root.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(
            f"dataset.server_path {clip(path)} does not exist on the server; give a folder under "
            f"{_allowed(roots)}"
        ) from None
    except OSError as err:
        raise InvalidArgument(
            f"dataset.server_path {clip(path)} cannot be read on the server "
            f"({err.strerror or type(err).__name__})"
        ) from None
    if not stat.S_ISDIR(mode):
        kind = "a file" if stat.S_ISREG(mode) else "not a folder"
        raise InvalidArgument(
            f"dataset.server_path {clip(path)} is {kind}; a dataset must be a folder: "
            "<folder>/<label>/<image> (ImageFolder) or a VOC folder (ImageSets/Segmentation/"
            "val.txt)"
        )
    if _is_dir(root / "ImageSets") or _is_dir(root / "JPEGImages"):
        return VOCFolder(root, roots, model_labels=labels, max_pixels=max_pixels)
    return FolderDataset(root, roots, labels, max_pixels=max_pixels)
