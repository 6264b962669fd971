"""Benchmark images: generated scenes or noise at the model's input size, encoded once, and
per-request stamps that make every image sent unique."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from vitlens.images import to_images
from vitlens.v1 import tensor_pb2

__all__ = ["make_images", "stamped"]


def make_images(
    kind: str, input_size: Sequence[int], count: int, seed: int = 0, wire: str = "pixels"
) -> list[bytes]:
    """``count`` distinct images at ``input_size`` (C, H, W), as serialised `Image` messages."""
    _, height, width = input_size
    if kind == "scenes" and height == width:
        from vitlens_server.data import SceneConfig, render_scene

        config = SceneConfig(size=height)
        arrays = [render_scene(seed + i, config=config).image for i in range(count)]
    elif kind in ("scenes", "random"):  # scenes are square; other inputs get noise
        rng = np.random.default_rng(seed)
        arrays = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]
    else:
        raise ValueError(f"images must be 'scenes' or 'random', got {kind!r}")
    if wire == "png":
        from PIL import Image

        encoded = []
        for a in arrays:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            encoded.append(buf.getvalue())
        messages = to_images(encoded)
    elif wire == "pixels":
        messages = to_images(arrays)
    else:
        raise ValueError(f"wire must be 'pixels' or 'png', got {wire!r}")
    return [m.SerializeToString() for m in messages]


_PNG_SIGNATURE_AND_IHDR = 8 + 4 + 4 + 13 + 4  # the IHDR chunk always comes first


def stamped(image: tensor_pb2.Image, tag: bytes) -> tensor_pb2.Image:
    """A copy of ``image`` whose bytes carry ``tag``: in the first pixel bytes of raw pixels, or
    in a ``tEXt`` chunk after a PNG's header (decoders ignore it)."""
    if image.HasField("pixels"):
        t = image.pixels
        data = tag + t.data[len(tag) :]
        return tensor_pb2.Image(pixels=tensor_pb2.Tensor(dtype=t.dtype, shape=t.shape, data=data))
    head, tail = image.encoded[:_PNG_SIGNATURE_AND_IHDR], image.encoded[_PNG_SIGNATURE_AND_IHDR:]
    text = b"vitlens-bench\x00" + tag.hex().encode()
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + text))
    return tensor_pb2.Image(encoded=head + chunk + tail)
