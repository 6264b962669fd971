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

`VOCDataset` reads such a folder defensively, since a server reads folders clients name: every
file goes through one opener (a server's checks each file against the folders it allows),
images and masks are size-checked from their headers before decoding, and every problem with a
file is a `BadFile` that names it relative to the folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from vitlens_server.data.scenes import CLASSES, SceneConfig, render_scene, split_seeds

__all__ = [
    "MAX_TEXT_BYTES",
    "VOC_CLASSES",
    "BadFile",
    "MissingFile",
    "Opener",
    "VOCDataset",
    "VOCSample",
    "export_voc",
    "open_regular",
    "read_image",
    "scene_id",
    "voc_palette",
]

# Pascal VOC's 20 object classes, in their standard order (mask value = index + 1).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

VOID = 255  # VOC's "ignore" value, on object borders and difficult regions
JPEG_QUALITY = 95
MAX_TEXT_BYTES = 16 * 2**20  # a split list or labels.txt; VOC2012's longest list is 40 kB
MAX_ID_BYTES = 200  # "<id>.jpg" stays well inside a 255-byte file name

Opener = Callable[[Path], BinaryIO]  # opens one file of a dataset for binary reading


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

    Every file is read through ``opener`` (a server passes one that checks each file against
    the folders it allows) and every problem with one is a `BadFile` naming the file relative to
    ``root``, so messages never show where ``root`` itself lies or what lies outside it.

    Args:
        root: the folder holding ``JPEGImages``, ``SegmentationClass`` and ``ImageSets``.
        split: which ``ImageSets/Segmentation/<split>.txt`` to read.
        labels: class names by index; default ``root/labels.txt`` if it exists, else
            `VOC_CLASSES`.
        max_pixels: images (and masks) with more pixels are refused from their header, before
            any pixel is decoded (a decompression-bomb guard); None: Pillow's own limit only.
        object_masks: read ``SegmentationObject`` too (``VOCSample.object_mask``).
        opener: opens one file for reading; default `open_regular` (symlinks followed).

    Raises:
        FileNotFoundError: ``root`` is not a folder; `MissingFile` for a missing split list.
        BadFile: the split list or ``labels.txt`` is unreadable, too large or malformed.
    """

    def __init__(
        self,
        root: Path,
        split: str = "val",
        labels: Sequence[str] | None = None,
        *,
        max_pixels: int | None = None,
        object_masks: bool = True,
        opener: Opener | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"VOC root {self.root} is not a directory")
        if not _is_file_name(split):
            raise ValueError(f"split must be a plain file name like 'val'; got {split[:64]!r}")
        self.split = split
        self.max_pixels = max_pixels
        self.object_masks = object_masks
        self._opener: Opener = opener or open_regular
        self.split_file = f"ImageSets/Segmentation/{split}.txt"
        self.ids: tuple[str, ...] = _read_ids(self._read_text(self.split_file), self.split_file)
        if labels is None:
            try:
                labels = self._read_text("labels.txt").split()
            except MissingFile:
                labels = VOC_CLASSES
            if not labels:
                raise BadFile("labels.txt", "lists no class names (one per line, in index order)")
        self.labels: tuple[str, ...] = tuple(labels)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> VOCSample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        name = self.ids[index]
        image = self._read_image(f"JPEGImages/{name}.jpg")  # (H, W, 3) uint8
        size = (image.shape[1], image.shape[0])
        class_file = f"SegmentationClass/{name}.png"
        class_mask = self._read_image(class_file, mask_size=size)
        object_mask = None
        if self.object_masks:
            with contextlib.suppress(MissingFile):  # VOC lacks some; our exports never do
                object_mask = self._read_image(f"SegmentationObject/{name}.png", mask_size=size)

        counts = np.bincount(class_mask.ravel(), minlength=256)  # (256,) pixels per value
        counts[[0, VOID]] = 0
        if counts[len(self.labels) + 1 :].any():
            bad = int(np.flatnonzero(counts[len(self.labels) + 1 :])[0]) + len(self.labels) + 1
            raise BadFile(
                class_file, f"holds class mask value {bad}, beyond the {len(self.labels)} labels"
            )
        present = np.flatnonzero(counts)
        order = present[np.argsort(-counts[present], kind="stable")]  # ties: lower class first
        labels = tuple(int(value) - 1 for value in order)
        return VOCSample(name, image, class_mask, object_mask, labels)

    def _open(self, file: str) -> BinaryIO:
        """``root/file`` opened; a missing file is a `MissingFile`, any other OSError a
        `BadFile` (errors the opener raises itself, such as a refusal, pass through)."""
        try:
            return self._opener(self.root / file)
        except FileNotFoundError:
            raise MissingFile(file, "is missing") from None
        except OSError as err:
            raise BadFile(file, f"cannot be read ({_why(err)})") from None

    def _read_text(self, file: str) -> str:
        with self._open(file) as handle:
            try:
                data = handle.read(MAX_TEXT_BYTES + 1)
            except OSError as err:
                raise BadFile(file, f"cannot be read ({_why(err)})") from None
        if len(data) > MAX_TEXT_BYTES:
            raise BadFile(file, f"is larger than {MAX_TEXT_BYTES // 2**20} MiB")
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise BadFile(file, f"is not UTF-8 text (at byte {err.start:,})") from None

    def _read_image(self, file: str, mask_size: tuple[int, int] | None = None) -> np.ndarray:
        with self._open(file) as handle:
            return read_image(handle, file, max_pixels=self.max_pixels, mask_size=mask_size)


class BadFile(ValueError):
    """A dataset file is unreadable, too large or malformed.

    Attributes:
        file: the file's path relative to the dataset folder (never absolute).
        reason: what is wrong, as a predicate: ``f"{file} {reason}"`` is the message.
    """

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file} {reason}")
        self.file = file
        self.reason = reason


class MissingFile(BadFile, FileNotFoundError):
    """A file the dataset needs does not exist."""


def open_regular(path: Path, *, follow_symlinks: bool = True) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file.

    A folder is an `IsADirectoryError`; a FIFO, socket or device an `OSError` (opened without
    blocking, so a FIFO cannot hang the reader). ``follow_symlinks=False`` refuses a path whose
    last component is a symlink (ELOOP): pass a resolved path that was checked, so a symlink
    swapped in after the check is not followed.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "it is a folder, not a file")
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "it is a FIFO, socket or device, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_image(
    handle: BinaryIO,
    file: str,
    *,
    max_pixels: int | None = None,
    mask_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode one image file: (H, W, 3) uint8 RGB, or with ``mask_size`` (W, H) an (H, W) uint8
    mask that must be an indexed (P) or greyscale (L) image of that size.

    Size and mode are checked from the header, before any pixel is decoded; every problem (an
    empty, non-image, corrupt or truncated file, too many pixels) is a `BadFile` naming ``file``.
    """
    try:
        if not handle.read(1):
            raise BadFile(file, "is empty (0 bytes)")
        handle.seek(0)
        with Image.open(handle) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise BadFile(
                    file,
                    f"is {width}x{height} = {width * height:,} pixels, above this server's limit "
                    f"of {max_pixels:,} (downscale it)",
                )
            if mask_size is None:
                return np.array(image.convert("RGB"))  # (H, W, 3) uint8, writable
            if image.mode not in ("P", "L"):
                raise BadFile(
                    file,
                    f"is a {image.mode}-mode image; a mask must be an indexed (P) or greyscale "
                    "(L) PNG",
                )
            if image.size != mask_size:
                raise BadFile(
                    file,
                    f"is {width}x{height} but its image is {mask_size[0]}x{mask_size[1]}; a mask "
                    "must have its image's size",
                )
            image.load()
            return np.array(image)  # (H, W) uint8 palette indices or grey levels
    except BadFile:
        raise
    except Image.DecompressionBombError:
        raise BadFile(file, "is too large to decode safely (a decompression bomb?)") from None
    except Image.UnidentifiedImageError:
        raise BadFile(file, "is not an image this server reads (JPEG, PNG, BMP or WebP)") from None
    except Exception as err:  # Pillow raises many types for truncated or corrupt files
        raise BadFile(file, f"is corrupt or truncated ({_why(err)})") from None


def _read_ids(text: str, file: str) -> tuple[str, ...]:
    """The image ids of a split list (whitespace-separated, one per line in VOC's lists)."""
    ids = []
    for number, line in enumerate(text.splitlines(), 1):
        for name in line.split():
            if not _is_file_name(name) or len(name.encode("utf-8")) > MAX_ID_BYTES:
                raise BadFile(
                    file,
                    f"line {number} holds no valid image id: an id names JPEGImages/<id>.jpg, "
                    f"without folders or control characters, at most {MAX_ID_BYTES} bytes",
                )
            ids.append(name)
    return tuple(ids)


def _is_file_name(name: str) -> bool:
    """A plain file name: no folder separator, no control character, not ``.`` or ``..``."""
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()
    )


def _why(err: BaseException) -> str:
    """An error's own words, without the file name an OSError carries (it may be absolute)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= 200 else text[:199] + "…"
