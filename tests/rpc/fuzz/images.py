"""Fuzz strategies for images: encoded files (valid, truncated, lying), pixel tensors whose
bytes and shape disagree, and image lists (`tests.rpc.fuzz`)."""

from __future__ import annotations

import functools
import io
import struct
import zlib
from typing import TypeVar

import numpy as np
from google.protobuf.message import Message
from hypothesis import strategies as st
from PIL import Image as PILImage

from tests.rpc.fuzz.basics import (
    INT64_MAX,
    INT64_MIN,
    ODD_DIMS,
    UNKNOWN_ENUMS,
    Catalog,
    Shown,
    ids,
)
from vitlens.v1 import tensor_pb2

M = TypeVar("M", bound=Message)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# Image formats and the modes Pillow writes them in (and reads back).
_MODES = {
    "PNG": ("RGB", "L", "RGBA", "P", "1", "I;16", "LA"),
    "JPEG": ("RGB", "L", "1", "CMYK"),
    "BMP": ("RGB", "L", "RGBA", "P", "1"),
    "GIF": ("RGB", "L", "P"),
    "TIFF": ("RGB", "L", "RGBA", "P", "I;16", "CMYK", "F"),
    "WEBP": ("RGB", "RGBA", "L"),
}
_ITEMSIZE = {tensor_pb2.DTYPE_UINT8: 1, tensor_pb2.DTYPE_FLOAT16: 2, tensor_pb2.DTYPE_FLOAT32: 4}


# --------------------------------------------------------------------------- images


def _encode(array: np.ndarray, fmt: str, mode: str) -> bytes:
    img = PILImage.fromarray(array, "RGB").convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


@st.composite
def encoded_images(draw: st.DrawFn, max_side: int = 48) -> bytes:
    """A real small image file: PNG, JPEG, BMP, GIF, TIFF or WebP, in one of several modes."""
    width, height = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    fmt = draw(st.sampled_from(list(_MODES)))
    mode = draw(st.sampled_from(_MODES[fmt]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return _encode(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), fmt, mode)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB pixels; ``idat`` is the raw scanline
    data before compression (a truncated file when it is short)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(idat))
        + _png_chunk(b"IEND", b"")
    )


@functools.cache
def blank_png(side: int) -> bytes:
    """A black ``side`` x ``side`` PNG: a few kB on the wire, ``3 * side²`` bytes decoded."""
    return png_with_header(side, side, (b"\x00" + bytes(3 * side)) * side)


@st.composite
def corrupt_encoded(draw: st.DrawFn) -> bytes:
    """Bytes that are not a decodable image, or a real one around the server's pixel limit."""
    kind = draw(
        st.sampled_from(
            ["truncated", "flipped", "random", "empty", "header", "claims", "large", "prefix"]
        )
    )
    if kind == "empty":
        return b""
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "header":
        return draw(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM"]))
    if kind == "claims":  # IHDR dimensions up to the PNG maximum, almost no data
        side = st.one_of(st.integers(1, 64), st.sampled_from([4097, 65_535, INT32_MAX]))
        return png_with_header(draw(side), draw(side), draw(st.binary(max_size=16)))
    if kind == "large":  # really decodable, just under and just over the 4096² test limit
        return blank_png(draw(st.sampled_from([2048, 4097])))
    data = draw(encoded_images())
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "prefix":
        return draw(st.binary(min_size=1, max_size=8)) + data
    flipped = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(flipped) - 1))
        flipped[i] ^= draw(st.integers(1, 255))
    return bytes(flipped)


_FLOAT_FILLS = ("unit", "nan", "inf", "-inf", "negative", "above", "max")


@st.composite
def pixel_tensors(
    draw: st.DrawFn, max_side: int = 40, odd_values: bool = False
) -> tensor_pb2.Tensor:
    """A well-formed pixel tensor, (H, W), (H, W, 1) or (H, W, 3); with ``odd_values``, float
    ones may hold NaN, ±Inf or values outside [0, 1]."""
    dtype = draw(st.sampled_from(list(_ITEMSIZE)))
    height, width = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    channels = draw(st.sampled_from([3, None, 1]))
    shape = (height, width) if channels is None else (height, width, channels)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype == tensor_pb2.DTYPE_UINT8:
        array = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        array = rng.random(shape)
        fill = draw(st.sampled_from(_FLOAT_FILLS)) if odd_values else "unit"
        spot = (0,) * len(shape)
        if fill in ("nan", "inf", "-inf"):
            array[spot] = float(fill)
        elif fill == "negative":
            array[spot] = -0.5
        elif fill == "above":
            array[spot] = 1.5
        elif fill == "max":
            array[spot] = 65504.0  # float16's largest
        array = array.astype("<f4" if dtype == tensor_pb2.DTYPE_FLOAT32 else "<f2")
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=array.tobytes())


@st.composite
def hostile_tensors(draw: st.DrawFn) -> tensor_pb2.Tensor:
    """A pixel tensor with one thing wrong: dtype, shape, byte count, rank or channels."""
    t = tensor_pb2.Tensor()
    t.CopyFrom(draw(pixel_tensors(max_side=8)))
    itemsize = _ITEMSIZE[t.dtype]
    kind = draw(st.sampled_from(["dtype", "shape", "bytes", "zero", "rank", "channels", "empty"]))
    if kind == "dtype":
        t.dtype = draw(st.sampled_from([tensor_pb2.DTYPE_UNSPECIFIED, *UNKNOWN_ENUMS]))
    elif kind == "shape":
        dims = st.one_of(st.sampled_from(ODD_DIMS), st.integers(INT64_MIN, INT64_MAX))
        t.shape[:] = draw(st.lists(dims, max_size=5))
    elif kind == "bytes":
        cut = draw(st.integers(-len(t.data), 8).filter(lambda n: n != 0))
        t.data = t.data[:cut] if cut < 0 else t.data + bytes(cut)
    elif kind == "zero":  # zero elements: no data bytes needed, whatever the other dimensions
        other = st.sampled_from([1, 3, 0, 2**31, 2**32, 2**62, INT64_MAX])
        shape = draw(st.lists(other, min_size=1, max_size=3))
        shape.insert(draw(st.integers(0, len(shape))), 0)
        t.shape[:], t.data = shape, b""
    elif kind == "rank":
        n = len(t.data) // itemsize
        t.shape[:] = draw(st.sampled_from([[n], [1, *t.shape], [], [*t.shape, 1, 1]]))
        if not t.shape:
            t.data = t.data[:itemsize]
    elif kind == "channels":
        c = draw(st.sampled_from([0, 2, 4, 5]))
        h, w = t.shape[0], t.shape[1]
        t.shape[:], t.data = [h, w, c], bytes(h * w * c * itemsize)
    else:
        t.Clear()
    return t


def _image(source: str, value: bytes | tensor_pb2.Tensor, image_id: str) -> tensor_pb2.Image:
    if source == "encoded":
        return tensor_pb2.Image(encoded=value, id=image_id)
    return tensor_pb2.Image(pixels=value, id=image_id)


def valid_images() -> st.SearchStrategy[tensor_pb2.Image]:
    return st.one_of(
        st.builds(_image, st.just("pixels"), pixel_tensors(), st.just("")),
        st.builds(_image, st.just("encoded"), encoded_images(), st.text(max_size=8)),
    )


def images() -> st.SearchStrategy[tensor_pb2.Image]:
    """A valid image (encoded or pixels), or a corrupt, hostile or empty one, any id."""
    malformed = st.builds(_image, st.just("pixels"), hostile_tensors(), ids())
    return st.one_of(
        valid_images(),
        st.builds(_image, st.just("encoded"), corrupt_encoded(), ids()),
        st.builds(_image, st.just("pixels"), pixel_tensors(odd_values=True), ids()),
        malformed,
        malformed,  # twice: the tensor decoding has the most ways to go wrong
        st.builds(tensor_pb2.Image, id=ids()),  # neither source set
    )


def single_images() -> st.SearchStrategy[Shown[tensor_pb2.Image]]:
    """One image for the decoders: a malformed or odd-valued tensor, a corrupt or lying
    file, or a valid one of either kind."""
    return st.one_of(
        hostile_tensors().map(lambda t: tensor_pb2.Image(pixels=t)),
        pixel_tensors(odd_values=True).map(lambda t: tensor_pb2.Image(pixels=t)),
        corrupt_encoded().map(lambda b: tensor_pb2.Image(encoded=b)),
        encoded_images().map(lambda b: tensor_pb2.Image(encoded=b)),
    ).map(Shown)


def hostile_image_lists(catalog: Catalog) -> st.SearchStrategy[list[tensor_pb2.Image]]:
    """One bad image among good ones, any images (none, or a few over the server's limit),
    or hundreds (copies of one)."""
    one_bad = st.builds(
        lambda before, bad, after: [*before, bad, *after],
        st.lists(valid_images(), max_size=1),
        images(),
        st.lists(valid_images(), max_size=1),
    )
    too_many = st.builds(lambda image, n: [image] * n, images(), st.sampled_from([64, 300]))
    return st.one_of(one_bad, st.lists(images(), max_size=catalog.max_images + 1), too_many)
