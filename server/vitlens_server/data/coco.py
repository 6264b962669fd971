"""Detection scenes as a COCO instances folder, and a reader for that layout (ours or COCO's).

Layout under ``directory``::

    annotations.json        COCO "instances" JSON: images, annotations, categories
    images/<file_name>      the images the JSON lists (ours: vitlens_detection_<seed>.png)

`export_coco` writes detection scenes (`detection_scene`): lossless PNGs, one annotation per
object with its exact mask as a compressed RLE (``counts`` a str), its ``bbox`` ``[x, y, w, h]``
read off the mask (`scene_boxes`), ``area`` the mask's pixel count and ``iscrowd`` 0. An image's
id is its seed. Category ids are 1-based, COCO's habit (id ``i + 1`` is ``CLASSES[i]``).

`COCODataset` reads such a folder defensively, since a server reads folders clients name: every
file goes through one opener (`data.voc.open_regular` unless a server passes its own checked
one), the JSON is size-limited and checked entry by entry before any image is read, a
``file_name`` may not leave the images folder, and a mask's run lengths are checked before
pycocotools decodes them (its C decoder trusts them). Every problem is a `BadFile` (a
`MissingFile` for a missing file) naming the file relative to ``directory``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from vitlens_server.data.detection import detection_scene, scene_boxes
from vitlens_server.data.scenes import CLASSES, SceneConfig
from vitlens_server.data.voc import BadFile, MissingFile, Opener, open_regular, read_image

__all__ = [
    "ANNOTATIONS",
    "IMAGES",
    "MAX_JSON_BYTES",
    "COCODataset",
    "COCOSample",
    "coco_image_name",
    "export_coco",
]

ANNOTATIONS = "annotations.json"
IMAGES = "images"
MAX_JSON_BYTES = 256 * 2**20  # COCO's val2017 instances file is 25 MB, train2017's 448 MB
MAX_POLYGON_POINTS = 100_000  # per annotation; COCO's most detailed polygons hold a few hundred
POLYGON_SLACK_PX = 1  # how far outside its image a polygon's vertex may lie (rounding)
_ECHO = 80  # the most of a JSON value a message repeats


def coco_image_name(seed: int) -> str:
    """The file name of detection scene ``seed``, e.g. ``vitlens_detection_000123.png``."""
    return f"vitlens_detection_{seed:06d}.png"


def export_coco(
    directory: Path, seeds: Sequence[int], *, config: SceneConfig | None = None
) -> Path:
    """Write detection scenes ``seeds`` as ``images/*.png`` and ``annotations.json``.

    ``annotations.json`` is replaced (it lists exactly ``seeds``); images already in ``images/``
    stay. ``config`` defaults to ``SceneConfig()``.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    (directory / IMAGES).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for seed in dict.fromkeys(int(s) for s in seeds):  # in order, each once
        scene = detection_scene(seed, config=config or SceneConfig())
        name = coco_image_name(seed)
        Image.fromarray(scene.image).save(directory / IMAGES / name)
        height, width = scene.image.shape[:2]
        images.append({"id": seed, "file_name": name, "height": height, "width": width})
        boxes = scene_boxes(scene)  # (K, 4) x1 y1 x2 y2
        rles = mask_utils.encode(np.asfortranarray(scene.masks.transpose(1, 2, 0), np.uint8))
        for label, rle, box, mask in zip(scene.labels, rles, boxes, scene.masks, strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": seed,
                    "category_id": int(label) + 1,
                    "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                    "area": int(mask.sum()),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": 0,
                }
            )
    dataset = {
        "info": {"description": "vitlens detection scenes (vitlens_server.data.coco)"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)
        ],
    }
    (directory / ANNOTATIONS).write_text(json.dumps(dataset, separators=(",", ":")))
    return directory


@dataclass(frozen=True, eq=False)
class COCOSample:
    """One image of a COCO folder and its objects.

    Attributes:
        id: the image's COCO id.
        file: the image file relative to the folder, e.g. ``images/vitlens_detection_000001.png``.
        image: (H, W, 3) uint8 RGB.
        labels: (K,) int64 indices into `COCODataset.categories`, in the JSON's order.
        masks: (K, H, W) bool, decoded from RLE or polygons.
        boxes: (K, 4) float32 (x1, y1, x2, y2) pixels: the ``bbox``, or the mask's box without one.
        crowd: (K,) bool, the ``iscrowd`` flags (COCO ignores crowd regions when scoring).
    """

    id: int
    file: str
    image: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    crowd: np.ndarray


@dataclass(frozen=True)
class _Image:
    id: int
    file: str  # relative to the folder
    height: int
    width: int


@dataclass(frozen=True)
class _Object:
    label: int
    segmentation: Any  # checked in form; run lengths checked when decoded
    box: tuple[float, float, float, float] | None  # x1 y1 x2 y2
    crowd: bool
    where: str  # "annotations[3] (id 17)", for messages


class COCODataset:
    """The images of a COCO instances folder, with their objects' masks, labels and boxes.

    Args:
        directory: the folder holding ``annotations`` and ``images``.
        annotations: the instances JSON, relative to ``directory``.
        images: the folder the JSON's ``file_name`` values are relative to.
        max_pixels: images with more pixels are refused from their header; None: Pillow's limit.
        max_json_bytes: a larger annotations file is refused unread.
        opener: opens one file for reading; default `open_regular` (symlinks followed).

    Attributes:
        categories: class names, in increasing category id (a sample's labels index these).
        category_ids: the categories' COCO ids, in the same order.

    Raises:
        FileNotFoundError: ``directory`` is not a folder; `MissingFile` without the JSON.
        BadFile: the JSON is unreadable, too large, not JSON, or not COCO instances: a missing
            key, a wrong type, a duplicate or unknown id, a ``file_name`` leaving ``images``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        annotations: str = ANNOTATIONS,
        images: str = IMAGES,
        max_pixels: int | None = None,
        max_json_bytes: int = MAX_JSON_BYTES,
        opener: Opener | None = None,
    ) -> None:
        self.root = Path(directory)
        if not self.root.is_dir():
            raise FileNotFoundError(f"COCO folder {self.root} is not a directory")
        self.annotations, self.images_folder = annotations, images
        self.max_pixels = max_pixels
        self._opener: Opener = opener or open_regular
        data = self._read_json(max_json_bytes)
        check = _Checker(annotations)
        check.that(isinstance(data, dict), "holds no JSON object (COCO's {images, annotations...})")
        for key in ("images", "annotations", "categories"):
            check.that(key in data, f'lacks the key "{key}" (COCO instances need it)')
            check.that(isinstance(data[key], list), f'"{key}" is not a list')

        self.category_ids, self.categories = _categories(check, data["categories"])
        self._images = _images(check, data["images"], images)
        self._objects = _objects(check, data["annotations"], self._images, self.category_ids)
        self.ids: tuple[int, ...] = tuple(image.id for image in self._images)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> COCOSample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        entry = self._images[index]
        with self._open(entry.file) as handle:
            image = read_image(handle, entry.file, max_pixels=self.max_pixels)  # (H, W, 3)
        if image.shape[:2] != (entry.height, entry.width):
            raise BadFile(
                entry.file,
                f"is {image.shape[1]}x{image.shape[0]} but {self.annotations} gives it as "
                f"{entry.width}x{entry.height}",
            )
        objects = self._objects[index]
        masks = np.zeros((len(objects), entry.height, entry.width), dtype=bool)  # (K, H, W)
        boxes = np.zeros((len(objects), 4), dtype=np.float32)  # (K, 4) x1 y1 x2 y2
        for k, obj in enumerate(objects):
            rle = _to_rle(obj.segmentation, entry, self.annotations, obj.where)
            masks[k] = mask_utils.decode(rle).astype(bool)
            if obj.box is None:
                x, y, w, h = mask_utils.toBbox(rle)
                boxes[k] = (x, y, x + w, y + h)
            else:
                boxes[k] = obj.box
        return COCOSample(
            id=entry.id,
            file=entry.file,
            image=image,
            labels=np.array([obj.label for obj in objects], dtype=np.int64),
            masks=masks,
            boxes=boxes,
            crowd=np.array([obj.crowd for obj in objects], dtype=bool),
        )

    def _open(self, file: str) -> BinaryIO:
        """``root/file`` opened; missing: `MissingFile`, another OSError: `BadFile` (errors the
        opener raises itself, such as a server's refusal, pass through)."""
        try:
            return self._opener(self.root / file)
        except FileNotFoundError:
            raise MissingFile(file, "is missing") from None
        except OSError as err:
            raise BadFile(file, f"cannot be read ({err.strerror or type(err).__name__})") from None

    def _read_json(self, max_bytes: int) -> Any:
        file = self.annotations
        with self._open(file) as handle:
            try:
                data = handle.read(max_bytes + 1)
            except OSError as err:
                raise BadFile(file, f"cannot be read ({err.strerror or 'OSError'})") from None
        if len(data) > max_bytes:
            raise BadFile(file, f"is larger than {max_bytes:,} bytes")
        try:
            return json.loads(data, parse_constant=_refuse_constant)
        except json.JSONDecodeError as err:
            raise BadFile(
                file, f"is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
            ) from None
        except UnicodeDecodeError:
            raise BadFile(file, "is not UTF-8 text") from None
        except RecursionError:
            raise BadFile(file, "nests its JSON too deeply") from None
        except ValueError as err:  # NaN or Infinity, refused by _refuse_constant
            raise BadFile(file, str(err)) from None


class _Checker:
    """Checks on the parsed JSON; each failure is a `BadFile` naming the JSON file."""

    def __init__(self, file: str) -> None:
        self.file = file

    def that(self, condition: bool, reason: str) -> None:
        if not condition:
            raise BadFile(self.file, reason)

    def field(self, row: Any, key: str, where: str) -> Any:
        self.that(isinstance(row, dict), f"{where} is not a JSON object")
        self.that(key in row, f'{where} lacks "{key}"')
        return row[key]

    def integer(self, row: Any, key: str, where: str, *, low: int | None = None) -> int:
        value = self.field(row, key, where)
        self.that(_is_int(value), f'{where}: "{key}" is {_echo(value)}, not a whole number')
        self.that(low is None or value >= low, f'{where}: "{key}" is {value}, below {low}')
        return value

    def string(self, row: Any, key: str, where: str) -> str:
        value = self.field(row, key, where)
        self.that(isinstance(value, str), f'{where}: "{key}" is {_echo(value)}, not text')
        return value


def _categories(check: _Checker, rows: list) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The categories' ids, increasing, and their names in that order."""
    names: dict[int, str] = {}
    for i, row in enumerate(rows):
        where = f"categories[{i}]"
        ident = check.integer(row, "id", where)
        check.that(ident not in names, f"{where} repeats category id {ident}")
        names[ident] = check.string(row, "name", where)
    ids = tuple(sorted(names))
    return ids, tuple(names[i] for i in ids)


def _images(check: _Checker, rows: list, folder: str) -> list[_Image]:
    """The images, in the JSON's order; a ``file_name`` must stay inside ``folder``."""
    images: list[_Image] = []
    seen: set[int] = set()
    for i, row in enumerate(rows):
        where = f"images[{i}]"
        ident = check.integer(row, "id", where)
        check.that(ident not in seen, f"{where} repeats image id {ident}")
        seen.add(ident)
        name = check.string(row, "file_name", where)
        check.that(
            _inside(name),
            f"{where} has file_name {_echo(name)}, which leaves the {folder} folder; a "
            "file_name is a relative path inside it, without '..'",
        )
        height = check.integer(row, "height", where, low=1)
        width = check.integer(row, "width", where, low=1)
        images.append(_Image(ident, f"{folder}/{name}", height, width))
    return images


def _objects(
    check: _Checker, rows: list, images: list[_Image], category_ids: tuple[int, ...]
) -> list[list[_Object]]:
    """Each image's objects, in the JSON's order, their forms checked."""
    index_of = {image.id: index for index, image in enumerate(images)}
    label_of = {ident: index for index, ident in enumerate(category_ids)}
    objects: list[list[_Object]] = [[] for _ in images]
    for i, row in enumerate(rows):
        where = f"annotations[{i}]"
        if isinstance(row, dict) and "id" in row:
            where += f" (id {_echo(row['id'])})"
        image_id = check.integer(row, "image_id", where)
        check.that(image_id in index_of, f"{where} has image_id {image_id}, which no image has")
        category = check.integer(row, "category_id", where)
        check.that(
            category in label_of,
            f"{where} has category_id {category}, which is not among the categories' ids "
            f"({_echo(list(category_ids))})",
        )
        segmentation = check.field(row, "segmentation", where)
        _check_segmentation(check, segmentation, images[index_of[image_id]], where)
        box = _check_box(check, row["bbox"], where) if "bbox" in row else None
        crowd = row.get("iscrowd", 0)
        check.that(_is_int(crowd) and crowd in (0, 1), f"{where}: iscrowd is not 0 or 1")
        objects[index_of[image_id]].append(
            _Object(label_of[category], segmentation, box, bool(crowd), where)
        )
    return objects


def _check_segmentation(check: _Checker, segm: Any, image: _Image, where: str) -> None:
    """The form of a segmentation: an RLE of the image's size, or polygons inside the image."""
    if isinstance(segm, dict):
        check.that(
            set(segm) >= {"size", "counts"},
            f'{where}: an RLE segmentation needs "size" and "counts"',
        )
        check.that(
            segm["size"] == [image.height, image.width],
            f"{where}: its RLE's size {_echo(segm['size'])} is not its image's "
            f"[height, width] [{image.height}, {image.width}]",
        )
        counts = segm["counts"]
        check.that(
            isinstance(counts, str)
            or (isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts)),
            f"{where}: its RLE counts are neither a compressed string nor whole numbers ≥ 0",
        )
        return
    check.that(
        isinstance(segm, list) and len(segm) > 0,
        f"{where}: its segmentation is neither an RLE object nor a list of polygons",
    )
    points = 0
    for polygon in segm:
        check.that(
            isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0,
            f"{where}: a polygon is not a list of at least 3 points [x1, y1, x2, y2, ...]",
        )
        check.that(
            all(_is_number(v) for v in polygon),
            f"{where}: a polygon holds a non-number (or one past 2**53)",
        )
        xs, ys, slack = polygon[0::2], polygon[1::2], POLYGON_SLACK_PX
        inside = min(xs + ys) >= -slack and max(xs) <= image.width + slack
        check.that(
            inside and max(ys) <= image.height + slack,
            f"{where}: a polygon reaches more than {slack} pixel outside its "
            f"{image.width}x{image.height} image",
        )
        points += len(xs)
    check.that(
        points <= MAX_POLYGON_POINTS,
        f"{where}: its polygons hold over {MAX_POLYGON_POINTS:,} points",
    )


def _check_box(check: _Checker, box: Any, where: str) -> tuple[float, float, float, float]:
    """COCO's ``bbox`` [x, y, w, h] → (x1, y1, x2, y2)."""
    check.that(
        isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box),
        f"{where}: its bbox {_echo(box)} is not [x, y, width, height]",
    )
    x, y, w, h = (float(v) for v in box)
    check.that(w >= 0 and h >= 0, f"{where}: its bbox {_echo(box)} has a negative width or height")
    return (x, y, x + w, y + h)


def _to_rle(segm: Any, image: _Image, file: str, where: str) -> dict:
    """A checked segmentation as one compressed RLE, its run lengths verified to cover exactly
    the image (pycocotools' decoder would write past its buffer otherwise)."""
    height, width = image.height, image.width
    if isinstance(segm, list):  # polygons, all inside the image (checked)
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    counts = segm["counts"]
    runs = counts if isinstance(counts, list) else _string_runs(counts, file, where)
    if any(run > height * width for run in runs) or sum(runs) != height * width:
        raise BadFile(
            file,
            f"{where}: its RLE's run lengths add up to {sum(runs):,} pixels, not its "
            f"{width}x{height} image's {height * width:,}",
        )
    if isinstance(counts, list):  # uncompressed, COCO's crowd regions
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": counts.encode("ascii")}


def _string_runs(counts: str, file: str, where: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string (6-bit groups, characters 48-111, every
    run from the third on a difference to the run two before), as pycocotools reads them."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift = 0, 0
        while True:
            code = ord(counts[position]) - 48 if position < len(counts) else -1
            if not 0 <= code < 64:
                bad = "ends inside a run" if code == -1 else f"holds {_echo(counts[position])}"
                raise BadFile(file, f"{where}: its RLE counts string {bad}")
            value |= (code & 0x1F) << shift
            position, shift = position + 1, shift + 5
            if not code & 0x20:
                if code & 0x10:
                    value |= -1 << shift
                break
            if shift > 35:
                raise BadFile(file, f"{where}: its RLE counts string holds an overlong run")
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise BadFile(file, f"{where}: its RLE counts string holds a negative run")
        runs.append(value)
    return runs


def _inside(name: str) -> bool:
    """A relative POSIX path without ``..``, empty parts, backslashes or control characters."""
    parts = name.split("/")
    return (
        bool(name)
        and name.isprintable()
        and "\\" not in name
        and not PurePosixPath(name).is_absolute()
        and all(part not in ("", ".", "..") for part in parts)
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite JSON number (a whole one within float's exact range: JSON's may be any size)."""
    if _is_int(value):
        return abs(value) < 2**53
    return isinstance(value, float) and math.isfinite(value)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"holds {name}, which JSON does not allow")


def _echo(value: Any) -> str:
    """``repr(value)`` cut to a message's size."""
    text = repr(value)
    return text if len(text) <= _ECHO else text[: _ECHO - 1] + "…"
