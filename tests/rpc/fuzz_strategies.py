"""Hypothesis strategies for the fuzz suite: mostly valid vitlens requests with hostile mutations.

Each request strategy first draws which of its fields may be hostile — none, exactly one, or
all of them (`Mutations`) — then draws every field from its valid strategy, the mutated one
from its hostile strategy, or, when all may be, each from either. So about a third of the
requests are valid, a third carry one mutation, and Hypothesis shrinks a failing example to
the one field that matters. `single_images` feeds the image decoders one image at a time.

What is valid comes from the server's registries (method parameters, metric options) and the
test model (`Catalog`); hostile means unknown names, 100 kB strings, NaN and ±Inf, raw enum
integers, tensors whose bytes and shape disagree, truncated or lying PNGs, paths with ``..``
or NUL, and so on.

Requests come wrapped in `Shown`, whose repr (what Hypothesis prints for a failing example) is
`describe`'s: long strings and bytes cut, long lists summarised.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from PIL import Image as PILImage

from vitlens.v1 import tensor_pb2, vitlens_pb2

__all__ = [
    "Catalog",
    "Mutations",
    "Param",
    "Shown",
    "deadlines_s",
    "describe",
    "evaluate_requests",
    "explain_requests",
    "hostile_strings",
    "images",
    "model_names",
    "predict_requests",
    "raw_payloads",
    "server_catalog",
    "single_images",
]

M = TypeVar("M", bound=Message)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT32_MAX = 2**32 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
HUGE_LENGTHS = (1_000, 100_000)  # characters of a "huge" string
# Enum values no version of the contract defines (proto3 enums are open: they reach the server).
UNKNOWN_ENUMS = (4, 7, 255, -1, INT32_MAX, INT32_MIN)
# Dimensions that break arithmetic: zero, negative, 32-bit and 64-bit edges.
ODD_DIMS = (0, 1, -1, 3, 2**31, 2**32, 2**62, INT64_MAX, INT64_MIN)
ODD_NUMBERS = (
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    -1e308,
    5e-324,
    -1.0,
    -0.0,
    0.5,
    2.0**53 + 1,
    2.0**63,
    float(INT32_MAX) + 1,
)
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


# --------------------------------------------------------------------------- the catalog


@dataclass(frozen=True)
class Param:
    """One method parameter or metric option, as `GetModel` describes it."""

    name: str
    type: str  # "float", "int", "bool" or "str"
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Catalog:
    """What a valid request to the test server may name.

    Attributes:
        model: the served model's name.
        num_classes, num_layers: its geometry (class indices, ``start_layer``).
        max_images: the server's ``max_images_per_request``.
        methods: explanation method → its parameters (``oracle`` and ``random`` included).
        metrics: Evaluate metric → its options.
    """

    model: str
    num_classes: int
    num_layers: int
    max_images: int
    methods: Mapping[str, tuple[Param, ...]]
    metrics: Mapping[str, tuple[Param, ...]]

    @property
    def method_names(self) -> list[str]:
        return sorted(self.methods)

    @property
    def metric_names(self) -> list[str]:
        return sorted(self.metrics)

    @property
    def all_params(self) -> list[str]:
        """Every parameter and option name (an unknown name for most methods)."""
        tables = [*self.methods.values(), *self.metrics.values()]
        return sorted({p.name for params in tables for p in params})


def server_catalog(model: str, num_classes: int, num_layers: int, max_images: int) -> Catalog:
    """The catalog of the server's method and metric registries for one model."""
    from vitlens_server.evaluate import METRICS
    from vitlens_server.explain import METHODS, get_method
    from vitlens_server.explain.params import describe_params

    def params(cls: type) -> tuple[Param, ...]:
        return tuple(Param(p.name, p.type, tuple(p.choices)) for p in describe_params(cls))

    return Catalog(
        model=model,
        num_classes=num_classes,
        num_layers=num_layers,
        max_images=max_images,
        methods={name: params(get_method(name).params) for name in METHODS},
        metrics={name: params(METRICS.get(name).options) for name in METRICS},
    )


# --------------------------------------------------------------------------- mutations


class Mutations:
    """Which fields of one request may be hostile: none, the one named, or all."""

    def __init__(self, hostile: str | None, every: bool = False) -> None:
        self.hostile, self.every = hostile, every

    def allows(self, name: str) -> bool:
        return self.every or self.hostile == name

    def draw(
        self, draw: st.DrawFn, name: str, valid: st.SearchStrategy, hostile: st.SearchStrategy
    ) -> Any:
        """Field ``name``: from ``hostile`` if it is the one mutated field, from either if all
        may be, else from ``valid``."""
        if self.hostile == name:
            return draw(hostile)
        return draw(st.one_of(valid, hostile) if self.every else valid)


def mutations(fields: Sequence[str]) -> st.SearchStrategy[Mutations]:
    """None first (what failing examples shrink towards), then one field, then all."""
    return st.one_of(
        st.just(Mutations(None)),
        st.sampled_from(list(fields)).map(Mutations),
        st.just(Mutations(None, every=True)),
    )


# --------------------------------------------------------------------------- strings


def hostile_strings() -> st.SearchStrategy[str]:
    """Empty, short odd text, or a 1 kB / 100 kB run of one (possibly multi-byte) character."""
    huge = st.builds(
        lambda char, n: char * n,
        st.sampled_from(["x", "é", "\x00", "💥", "../", "%s"]),
        st.sampled_from(HUGE_LENGTHS),
    )
    return st.one_of(st.just(""), st.text(max_size=12), huge)


def odd_names(valid: Sequence[str]) -> st.SearchStrategy[str]:
    """Almost a valid name (case, spaces, NUL, truncated), or any hostile string."""
    known = st.sampled_from(list(valid))
    return st.one_of(
        known.map(str.upper),
        known.map(lambda s: f" {s}"),
        known.map(lambda s: f"{s}\x00"),
        known.map(lambda s: s[:-1]),
        hostile_strings(),
    )


def deadlines_s(default_s: float) -> st.SearchStrategy[float]:
    """The call's deadline: ``default_s``, or one so short the call ends while the server
    decodes, queues or computes it (DEADLINE_EXCEEDED; the server must not mind)."""
    return st.one_of(st.just(default_s), st.sampled_from([0.001, 0.01, 0.05, 0.3]))


def model_names(catalog: Catalog) -> st.SearchStrategy[str]:
    """The model, the default (empty), or another name."""
    return st.one_of(st.sampled_from([catalog.model, ""]), odd_names([catalog.model]))


def ids() -> st.SearchStrategy[str]:
    return st.one_of(st.just(""), st.text(max_size=8), hostile_strings())


# --------------------------------------------------------------------------- Struct values


def _number(x: float) -> struct_pb2.Value:
    return struct_pb2.Value(number_value=x)


def _list(values: list[struct_pb2.Value]) -> struct_pb2.Value:
    return struct_pb2.Value(list_value=struct_pb2.ListValue(values=values))


def _struct(fields: Mapping[str, struct_pb2.Value]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    for key, value in fields.items():
        s.fields[key].CopyFrom(value)
    return s


def hostile_values() -> st.SearchStrategy[struct_pb2.Value]:
    """Any `Value`: NaN, ±Inf, huge and negative numbers, bools, strings, null, a Value with no
    kind set, and lists and structs of those, nested."""
    scalars = st.one_of(
        st.sampled_from(ODD_NUMBERS).map(_number),
        st.floats(allow_nan=True, allow_infinity=True).map(_number),
        st.integers(-(2**53), 2**53).map(lambda i: _number(float(i))),
        st.booleans().map(lambda b: struct_pb2.Value(bool_value=b)),
        hostile_strings().map(lambda s: struct_pb2.Value(string_value=s)),
        st.just(struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)),
        st.just(struct_pb2.Value()),  # no kind: not representable in JSON
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3).map(_list),
            st.dictionaries(st.text(max_size=6), inner, max_size=3).map(
                lambda d: struct_pb2.Value(struct_value=_struct(d))
            ),
        ),
        max_leaves=6,
    )


def valid_values(param: Param, catalog: Catalog) -> st.SearchStrategy[struct_pb2.Value]:
    """A value the parameter accepts, kept small so the computation it asks for is cheap."""
    if param.type == "bool":
        return st.booleans().map(lambda b: struct_pb2.Value(bool_value=b))
    if param.type == "str":
        strings = st.sampled_from(param.choices) if param.choices else st.text(max_size=8)
        return strings.map(lambda s: struct_pb2.Value(string_value=s))
    if param.type == "int":
        if "layer" in param.name:
            ints = st.integers(0, catalog.num_layers - 1)
        elif param.name in ("samples", "steps", "batch_size"):
            ints = st.integers(1, 4)
        else:
            ints = st.integers(0, 4)
        return ints.map(lambda i: _number(float(i)))
    return st.floats(0.0, 0.9).map(_number)


@st.composite
def option_structs(
    draw: st.DrawFn, params: Sequence[Param], catalog: Catalog, *, hostile: bool = False
) -> struct_pb2.Struct:
    """Options for one method or metric: some of its parameters with valid values, or, when
    ``hostile``, with any values and with names it does not have (another method's, any)."""
    chosen = draw(st.lists(st.sampled_from(list(params)), unique=True)) if params else []
    fields: dict[str, struct_pb2.Value] = {}
    for p in chosen:
        valid = valid_values(p, catalog)
        fields[p.name] = draw(st.one_of(valid, hostile_values()) if hostile else valid)
    if hostile:
        unknown = st.one_of(st.sampled_from(catalog.all_params), hostile_strings())
        for name, value in draw(st.dictionaries(unknown, hostile_values(), max_size=2)).items():
            fields.setdefault(name, value)
    return _struct(fields)


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


# --------------------------------------------------------------------------- Explain, Predict


def _class_indices(catalog: Catalog, hostile: bool) -> st.SearchStrategy[int]:
    valid = st.integers(0, catalog.num_classes - 1)
    if not hostile:
        return valid
    edges = st.sampled_from([-1, catalog.num_classes, INT32_MIN, INT32_MAX])
    return st.one_of(valid, edges, st.integers(INT32_MIN, INT32_MAX))


def _top_k(catalog: Catalog, hostile: bool) -> st.SearchStrategy[int]:
    valid = st.integers(0, catalog.num_classes)  # 0: the server's default
    if not hostile:
        return valid
    return st.one_of(valid, st.sampled_from([2**31, UINT32_MAX]), st.integers(0, UINT32_MAX))


@st.composite
def targets(
    draw: st.DrawFn, num_images: int, catalog: Catalog, hostile: bool
) -> vitlens_pb2.Target | None:
    """Unset, predicted, one class, one per image or top-k; when ``hostile``, indices out of
    range, lists of the wrong length, k of 0 or 2³² - 1."""
    kind = draw(st.sampled_from(["unset", "predicted", "class_index", "per_image", "top_k"]))
    index = _class_indices(catalog, hostile)
    if kind == "unset":
        return None
    if kind == "predicted":
        return vitlens_pb2.Target(predicted=draw(st.booleans()))
    if kind == "class_index":
        return vitlens_pb2.Target(class_index=draw(index))
    if kind == "per_image":
        length = st.integers(0, num_images + 2) if hostile else st.just(num_images)
        indices = draw(st.lists(index, min_size=(n := draw(length)), max_size=n))
        return vitlens_pb2.Target(per_image=vitlens_pb2.ClassIndices(indices=indices))
    k = st.integers(1, catalog.num_classes)
    if hostile:
        k = st.one_of(k, st.sampled_from([0, catalog.num_classes + 1, UINT32_MAX]))
    return vitlens_pb2.Target(top_k=draw(k))


EXPLAIN_FIELDS = (
    "model",
    "method",
    "images",
    "target",
    "grid",
    "output_dtype",
    "top_k_predictions",
    "method_options",
)


@st.composite
def _explain_requests(draw: st.DrawFn, catalog: Catalog) -> vitlens_pb2.ExplainRequest:
    mut = draw(mutations(EXPLAIN_FIELDS))
    images_ = mut.draw(
        draw,
        "images",
        st.lists(valid_images(), min_size=1, max_size=2),
        hostile_image_lists(catalog),
    )
    method = mut.draw(
        draw,
        "method",
        st.sampled_from(["", *catalog.method_names]),
        odd_names(catalog.method_names),
    )
    output_dtypes = [0, tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT16]
    options = vitlens_pb2.ExplainOptions(
        grid=mut.draw(draw, "grid", st.sampled_from([0, 1]), st.sampled_from(UNKNOWN_ENUMS)),
        return_relevance=draw(st.booleans()),
        output_dtype=mut.draw(
            draw,
            "output_dtype",
            st.sampled_from(output_dtypes),
            st.sampled_from([tensor_pb2.DTYPE_UINT8, *UNKNOWN_ENUMS]),
        ),
        top_k_predictions=draw(_top_k(catalog, mut.allows("top_k_predictions"))),
    )
    if draw(st.booleans()):
        params = catalog.methods.get(method or "generic", ())
        hostile = mut.allows("method_options")
        options.method_options.CopyFrom(draw(option_structs(params, catalog, hostile=hostile)))
    request = vitlens_pb2.ExplainRequest(
        model=mut.draw(
            draw, "model", st.sampled_from([catalog.model, ""]), odd_names([catalog.model])
        ),
        method=method,
        images=images_,
        options=options,
    )
    target = draw(targets(len(images_), catalog, mut.allows("target")))
    if target is not None:
        request.target.CopyFrom(target)
    return request


@st.composite
def _predict_requests(draw: st.DrawFn, catalog: Catalog) -> vitlens_pb2.PredictRequest:
    mut = draw(mutations(("model", "images", "top_k")))
    return vitlens_pb2.PredictRequest(
        model=mut.draw(
            draw, "model", st.sampled_from([catalog.model, ""]), odd_names([catalog.model])
        ),
        images=mut.draw(
            draw,
            "images",
            st.lists(valid_images(), min_size=1, max_size=2),
            hostile_image_lists(catalog),
        ),
        top_k=draw(_top_k(catalog, mut.allows("top_k"))),
    )


# --------------------------------------------------------------------------- Evaluate

# Dataset specs the parser must refuse (or, for the large valid counts, the deadline must stop).
ODD_SYNTHETIC = (
    "",
    "synthetic:",
    "synthetic:0",
    "synthetic:-1",
    "synthetic:x",
    "synthetic:1:2:3",
    "synthetic:1:-1",
    "synthetic:1.5",
    "synthetic:1e3",
    "synthetic: 1",
    "synthetic:1_0",
    "synthetic:٣",
    "synthetic:1:two_object:two_object",
    "two_object",
    "synthetic:5000000",
    "synthetic:100000000",
    "synthetic:1:100000000",
    "synthetic:99999999999999999999999",
)


def valid_synthetic() -> st.SearchStrategy[str]:
    """``synthetic:N[:seed][:two_object]`` with N of 1 or 2 (the prefix is optional)."""
    return st.builds(
        lambda prefix, n, seed, two: f"{prefix}{n}{'' if seed is None else f':{seed}'}{two}",
        st.sampled_from(["synthetic:", ""]),
        st.integers(1, 2),
        st.one_of(st.none(), st.integers(0, 50)),
        st.sampled_from(["", ":two_object"]),
    )


def odd_server_paths(root: Path) -> st.SearchStrategy[str]:
    """Paths that are not a usable dataset or must not escape the root: relative, ``..``,
    NUL, overlong, symlinks out, files, missing, and folders of the test tree that are broken
    (see test_fuzz's ``build_dataset_tree``)."""
    r = str(root)
    return st.one_of(
        st.sampled_from(
            [
                f"{r}/voc",
                f"{r}/escape",
                f"{r}/corrupt",
                f"{r}/badlabel",
                r,
                "",
                "folder",
                "./folder",
                "..",
                f"{r}/../{root.name}/folder",
                f"{r}/..",
                f"{r}/folder/../../..",
                f"{r}/folder\x00",
                f"{r}/\x00/folder",
                f"{r}/{'a' * 300}",
                f"{r}/{'a/' * 3000}",
                "/",
                "/etc",
                "/proc/self/root",
                f"{r}/link_out",
                f"{r}/missing",
                f"{r}/file.txt",
                f"{r}/empty",
                f"{r}/folder/c0/a.png",
                "~",
                f"//{r}/folder",
                f"file://{r}/folder",
            ]
        ),
        st.text(max_size=16),
    )


@st.composite
def masks(draw: st.DrawFn, height: int, width: int, hostile: bool) -> tensor_pb2.Tensor:
    """A (H, W) uint8 mask; when ``hostile``, one of the wrong size, rank or dtype too."""
    kinds = ["match", "size", "hw1", "float", "tensor"] if hostile else ["match"]
    kind = draw(st.sampled_from(kinds))
    if kind == "tensor":
        return draw(hostile_tensors())
    if kind == "size":
        height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (height, width, 1) if kind == "hw1" else (height, width)
    if kind == "float":
        values = np.asarray(rng.random(shape), dtype="<f4")
        return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=shape, data=values.tobytes())
    mask = rng.integers(0, 2, shape, dtype=np.uint8)
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=shape, data=mask.tobytes())


@st.composite
def inline_samples(
    draw: st.DrawFn, catalog: Catalog, with_mask: bool, hostile: bool
) -> vitlens_pb2.Sample:
    """A sample of a pixel image with its label and, ``with_mask``, its mask; when
    ``hostile``, any image, labels out of range and masks that do not fit."""
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = tensor_pb2.Image(
        pixels=tensor_pb2.Tensor(
            dtype=tensor_pb2.DTYPE_UINT8, shape=pixels.shape, data=pixels.tobytes()
        )
    )
    if hostile:
        image = draw(st.one_of(st.just(image), images()))
    sample = vitlens_pb2.Sample(image=image, label=draw(_class_indices(catalog, hostile)))
    if with_mask or (hostile and draw(st.booleans())):
        sample.mask.CopyFrom(draw(masks(height, width, hostile)))
    return sample


@st.composite
def valid_datasets(draw: st.DrawFn, catalog: Catalog, root: Path) -> vitlens_pb2.Dataset:
    kind = draw(st.sampled_from(["synthetic", "inline", "server_path"]))
    limit = draw(st.integers(0, 2))
    if kind == "synthetic":
        return vitlens_pb2.Dataset(synthetic=draw(valid_synthetic()), limit=limit)
    if kind == "server_path":
        return vitlens_pb2.Dataset(server_path=f"{root}/folder", limit=limit)
    with_mask = draw(st.booleans())
    samples = draw(st.lists(inline_samples(catalog, with_mask, False), min_size=1, max_size=2))
    return vitlens_pb2.Dataset(inline=vitlens_pb2.InlineDataset(samples=samples), limit=limit)


@st.composite
def hostile_datasets(draw: st.DrawFn, catalog: Catalog, root: Path) -> vitlens_pb2.Dataset | None:
    kind = draw(st.sampled_from(["synthetic", "inline", "server_path", "unset"]))
    limit = draw(st.one_of(st.integers(0, 2), st.just(UINT32_MAX)))
    if kind == "unset":
        return vitlens_pb2.Dataset(limit=limit) if limit else None
    if kind == "synthetic":
        spec = st.one_of(st.sampled_from(ODD_SYNTHETIC), st.text(max_size=16))
        return vitlens_pb2.Dataset(synthetic=draw(spec), limit=limit)
    if kind == "server_path":
        return vitlens_pb2.Dataset(server_path=draw(odd_server_paths(root)), limit=limit)
    some = st.lists(inline_samples(catalog, False, True), max_size=3)
    many = st.builds(  # copies of one sample: 1x1 images over and under an inline bound
        lambda sample, n: [sample] * n,
        inline_samples(catalog, False, False),
        st.sampled_from([300, 5000]),
    )
    samples = draw(st.one_of(some, many))
    return vitlens_pb2.Dataset(inline=vitlens_pb2.InlineDataset(samples=samples), limit=limit)


EVALUATE_FIELDS = ("model", "methods", "metrics", "dataset", "method_options", "metric_options")


@st.composite
def _option_maps(
    draw: st.DrawFn,
    table: Mapping[str, tuple[Param, ...]],
    requested: Sequence[str],
    catalog: Catalog,
    hostile: bool,
) -> dict[str, struct_pb2.Struct]:
    """Options keyed by requested names; when ``hostile``, also by unrequested or unknown
    names, with hostile values."""
    keys = st.sampled_from(list(requested)) if requested else st.nothing()
    if hostile:
        keys = st.one_of(keys, st.sampled_from(sorted(table)), odd_names(sorted(table)))
    elif not requested:
        return {}
    chosen = draw(st.lists(keys, max_size=2, unique=True))
    return {
        key: draw(option_structs(table.get(key, ()), catalog, hostile=hostile)) for key in chosen
    }


@st.composite
def _evaluate_requests(
    draw: st.DrawFn, catalog: Catalog, root: Path
) -> vitlens_pb2.EvaluateRequest:
    mut = draw(mutations(EVALUATE_FIELDS))

    def name_lists(valid: list[str], field: str) -> list[str]:
        good = st.lists(st.sampled_from(valid), min_size=1, max_size=2, unique=True)
        bad = st.lists(st.one_of(st.sampled_from(valid), odd_names(valid)), max_size=3)
        return mut.draw(draw, field, good, bad)

    methods = name_lists(catalog.method_names, "methods")
    metrics = name_lists(catalog.metric_names, "metrics")
    request = vitlens_pb2.EvaluateRequest(
        model=mut.draw(
            draw, "model", st.sampled_from([catalog.model, ""]), odd_names([catalog.model])
        ),
        methods=methods,
        metrics=metrics,
        explain_label=draw(st.booleans()),
    )
    dataset = mut.draw(
        draw, "dataset", valid_datasets(catalog, root), hostile_datasets(catalog, root)
    )
    if dataset is not None:
        request.dataset.CopyFrom(dataset)
    method_options = _option_maps(catalog.methods, methods, catalog, mut.allows("method_options"))
    for key, options in draw(method_options).items():
        request.method_options[key].CopyFrom(options)
    metric_options = _option_maps(catalog.metrics, metrics, catalog, mut.allows("metric_options"))
    for key, options in draw(metric_options).items():
        request.metric_options[key].CopyFrom(options)
    return request


# --------------------------------------------------------------------------- raw bytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes = b"") -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _nested_struct(depth: int) -> bytes:
    """ExplainRequest.options.method_options nested ``depth`` Structs deep (Struct → fields map
    entry → Value.struct_value → Struct ...): past protobuf's recursion limit."""
    inner = b""
    for _ in range(depth):
        value = _field(5, 2, _varint(len(inner)) + inner)  # Value.struct_value
        entry = _field(1, 2, b"\x01k") + _field(2, 2, _varint(len(value)) + value)
        inner = _field(1, 2, _varint(len(entry)) + entry)  # Struct.fields
    options = _field(5, 2, _varint(len(inner)) + inner)  # ExplainOptions.method_options
    return _field(5, 2, _varint(len(options)) + options)  # ExplainRequest.options


KNOWN_BAD_PAYLOADS = (
    b"\xff",
    b"\x08" + b"\x80" * 10 + b"\x01",  # an 11-byte varint
    _field(3, 2, _varint(2**31)),  # a length far past the end
    _field(1, 6),  # wire types 6 and 7 do not exist
    _field(1, 7),
    _field(3, 3),  # a group that never ends
    _field(3, 4),  # an end-group that never began
    b"\x00",  # field number 0
    _field(2**29 - 1, 0, b"\x01"),  # the largest field number, unknown
    _field(1, 2, b"\x02\xff\xfe"),  # a string field (model, name) holding invalid UTF-8
    _field(2, 2, b"\x03\xc3\x28a"),
    _nested_struct(120),
    _nested_struct(1000),
)


@st.composite
def mutated(draw: st.DrawFn, payload: bytes) -> bytes:
    """``payload`` truncated, with bytes flipped or inserted, repeated, or with a known-bad
    encoding appended."""
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "append", "repeat"]))
    data = bytearray(payload)
    if kind == "truncate" and data:
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flip" and data:
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "insert":
        at = draw(st.integers(0, len(data)))
        return bytes(data[:at]) + draw(st.binary(min_size=1, max_size=8)) + bytes(data[at:])
    if kind == "repeat":
        return bytes(data) * draw(st.integers(2, 3))
    return bytes(data) + draw(st.sampled_from(KNOWN_BAD_PAYLOADS))


def raw_payloads(catalog: Catalog) -> st.SearchStrategy[bytes]:
    """Any byte string: random, a known-bad encoding, or a small valid request mutated."""
    small = vitlens_pb2.ExplainRequest(
        method="raw_attention",
        images=[
            tensor_pb2.Image(pixels=tensor_pb2.Tensor(dtype=1, shape=[4, 4, 3], data=bytes(48)))
        ],
    )
    seeds = st.one_of(
        st.just(small.SerializeToString()),
        _explain_requests(catalog).map(lambda m: m.SerializeToString()),
        _predict_requests(catalog).map(lambda m: m.SerializeToString()),
    )
    return st.one_of(
        st.binary(max_size=64),
        st.sampled_from(KNOWN_BAD_PAYLOADS),
        seeds.flatmap(mutated),
    )


# --------------------------------------------------------------------------- showing requests

_SHOWN_CHARS = 60  # of a string or bytes value
_SHOWN_ITEMS = 4  # of a repeated field


def _show_scalar(field: FieldDescriptor, value: Any) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return f"{field.message_type.name}({describe(value)})"
    if field.type == FieldDescriptor.TYPE_ENUM:
        names = field.enum_type.values_by_number
        return names[value].name if value in names else str(value)
    text = field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
    if text and len(value) > _SHOWN_CHARS:
        return f"{value[: _SHOWN_CHARS // 2]!r}…({len(value):,} in all)"
    return repr(value)


def describe(message: Message) -> str:
    """The set fields of ``message`` on one line, with strings and bytes over 60 characters
    cut, repeated fields after their first four items summarised, and enums by name."""
    parts = []
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            key_field = field.message_type.fields_by_name["key"]
            items = [
                f"{_show_scalar(key_field, k)}: {_show_scalar(value_field, v)}"
                for k, v in sorted(value.items())
            ]
            parts.append(f"{field.name}={{{', '.join(items)}}}")
        elif field.is_repeated:
            items = [_show_scalar(field, v) for v in list(value)[:_SHOWN_ITEMS]]
            if len(value) > _SHOWN_ITEMS:
                items.append(f"… {len(value)} in all")
            parts.append(f"{field.name}=[{', '.join(items)}]")
        else:
            parts.append(f"{field.name}={_show_scalar(field, value)}")
    return ", ".join(parts)


class Shown(Generic[M]):
    """A request whose repr, which Hypothesis prints for a failing example, is `describe`'s."""

    def __init__(self, message: M) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self.message).__name__}({describe(self.message)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def explain_requests(catalog: Catalog) -> st.SearchStrategy[Shown[vitlens_pb2.ExplainRequest]]:
    return _explain_requests(catalog).map(Shown)


def predict_requests(catalog: Catalog) -> st.SearchStrategy[Shown[vitlens_pb2.PredictRequest]]:
    return _predict_requests(catalog).map(Shown)


def evaluate_requests(
    catalog: Catalog, root: Path
) -> st.SearchStrategy[Shown[vitlens_pb2.EvaluateRequest]]:
    return _evaluate_requests(catalog, root).map(Shown)
