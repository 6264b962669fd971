"""Turn what users hold (paths, bytes, numpy arrays, PIL images) into `vitlens.v1.Image` messages.

Files and PIL images travel encoded (the server decodes them); arrays travel as pixel tensors.
PIL is never imported here: PIL images are recognised by their type's module.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from vitlens.tensors import numpy_to_tensor
from vitlens.v1 import tensor_pb2

__all__ = ["ImageInput", "to_image", "to_images"]

ImageInput: TypeAlias = (
    "str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray | tensor_pb2.Image | Any"
)
"""One image: a path, encoded file bytes, an (H, W) or (H, W, C) array, a PIL image, or an
`Image` message."""

# PIL modes that PNG stores as they are; anything else is converted to RGB first.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})


def _is_pil(x: object) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "save") and hasattr(x, "mode")


def _is_single(x: object) -> bool:
    return isinstance(
        x, str | os.PathLike | bytes | bytearray | memoryview | np.ndarray | tensor_pb2.Image
    ) or _is_pil(x)


def _from_path(path: str | os.PathLike[str]) -> tensor_pb2.Image:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {os.fspath(path)}")
    return tensor_pb2.Image(encoded=p.read_bytes(), id=p.name)


def _from_pil(img: Any) -> tensor_pb2.Image:
    if img.mode not in _PNG_MODES:
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return tensor_pb2.Image(encoded=buf.getvalue())


def _from_array(a: np.ndarray) -> tensor_pb2.Image:
    """(H, W) or (H, W, C) with C in 1, 3 (4: alpha dropped) -> pixels tensor."""
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"array of shape {a.shape} looks channels-first (C, H, W); pass (H, W, C) "
            "instead, e.g. a.transpose(1, 2, 0)"
        )
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3)):
        hint = "; for several images pass a list of arrays" if a.ndim == 4 else ""
        raise ValueError(
            f"image arrays must be (H, W) or (H, W, C) with C in 1 or 3, got shape {a.shape}" + hint
        )
    if a.dtype == np.uint8:
        return tensor_pb2.Image(pixels=numpy_to_tensor(a))
    if a.dtype.kind in "iu":
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(
                f"integer pixels must lie in 0..255, got {a.min()}..{a.max()} ({a.dtype})"
            )
        return tensor_pb2.Image(pixels=numpy_to_tensor(a, dtype=np.uint8))
    if a.dtype.kind == "f":
        if a.size and np.nanmax(a) > 1.0 + 1e-3:
            raise ValueError(
                f"float pixels must lie in 0..1, got a maximum of {float(np.nanmax(a))}; "
                "divide by 255 or pass uint8"
            )
        wire = np.float16 if a.dtype == np.float16 else np.float32
        return tensor_pb2.Image(pixels=numpy_to_tensor(a, dtype=wire))
    raise TypeError(f"image arrays must be uint8 (0..255) or float (0..1), got {a.dtype}")


def to_image(x: ImageInput, id: str | None = None) -> tensor_pb2.Image:
    """Convert one image to an `Image` message.

    Args:
        x: a file path (str or os.PathLike; the file's bytes are sent encoded), encoded bytes
            (bytes, bytearray, memoryview), a numpy array (H, W) or (H, W, C) with C = 1 or 3
            (4: alpha dropped) -- uint8 in 0..255 or float in 0..1 --, a PIL image (sent as
            PNG), or an `Image` message (copied, not modified).
        id: identifier echoed in the result. None: the file name for paths, the message's own
            id for `Image` messages, else "".

    Raises:
        FileNotFoundError: the path names no file.
        ValueError: an array of the wrong shape (e.g. channels-first) or value range.
        TypeError: an unsupported input or array dtype.
    """
    if isinstance(x, tensor_pb2.Image):
        img = tensor_pb2.Image()
        img.CopyFrom(x)
    elif isinstance(x, str | os.PathLike):
        img = _from_path(x)
    elif isinstance(x, bytes | bytearray | memoryview):
        img = tensor_pb2.Image(encoded=bytes(x))
    elif isinstance(x, np.ndarray):
        img = _from_array(x)
    elif _is_pil(x):
        img = _from_pil(x)
    else:
        raise TypeError(
            f"cannot send {type(x).__name__} as an image; pass a path, bytes, a numpy array, "
            "a PIL image or a vitlens.v1.Image"
        )
    if id is not None:
        img.id = id
    return img


def to_images(
    images: ImageInput | Iterable[ImageInput],
    ids: Sequence[str] | None = None,
) -> list[tensor_pb2.Image]:
    """Convert one image or an iterable of images to a list of `Image` messages.

    A numpy array is always one image; a list of arrays is several. ``ids``, when given, must
    have one entry per image and overrides the default ids (see `to_image`).

    Raises:
        ValueError: no images, or ``ids`` of the wrong length; plus anything `to_image` raises.
    """
    if _is_single(images) or not isinstance(images, Iterable):
        items: list[Any] = [images]
    else:
        items = list(images)
    if not items:
        raise ValueError("no images given")
    if ids is not None:
        if isinstance(ids, str):
            raise TypeError("ids must be a sequence of strings, not a single string")
        if len(ids) != len(items):
            raise ValueError(f"got {len(ids)} ids for {len(items)} images")
        return [to_image(x, id=i) for x, i in zip(items, ids, strict=True)]
    return [to_image(x) for x in items]
