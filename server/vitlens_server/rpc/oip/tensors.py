"""Open Inference Protocol tensors ↔ numpy arrays.

A tensor's elements travel either as one raw little-endian buffer (``raw_input_contents``,
what Triton clients send) or in the typed repeated field of its datatype (``contents``).
BYTES elements are byte strings; in a raw buffer each one is preceded by its length as a
4-byte little-endian unsigned integer. Every mismatch between a tensor's datatype, shape and
elements is an `InvalidArgument` naming the tensor and saying what to send instead.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from vitlens_server.errors import InvalidArgument
from vitlens_server.rpc.oip import grpc_service_pb2 as pb

__all__ = ["DTYPES", "MAX_DIM", "MAX_RANK", "checked_shape", "decode", "encode"]

# The fixed-size datatypes numpy can hold, as little-endian dtypes. (BYTES is variable-size;
# BF16 has no numpy type.)
DTYPES = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# Where each datatype's elements go in InferTensorContents (FP16 and BF16: raw only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_FIELDS = tuple(field.name for field in pb.InferTensorContents.DESCRIPTOR.fields)
MAX_RANK = 8
MAX_DIM = 2**31 - 1
_LENGTH = struct.Struct("<I")


def checked_shape(shape: Sequence[int], where: str) -> tuple[int, ...]:
    """``shape`` as a tuple, refused when a dimension is negative or above `MAX_DIM` or there
    are more than `MAX_RANK` of them."""
    if len(shape) > MAX_RANK:
        raise InvalidArgument(
            f"{where} has {len(shape)} dimensions; at most {MAX_RANK} are accepted",
            field=where,
        )
    for dim in shape:
        if not 0 <= dim <= MAX_DIM:
            raise InvalidArgument(
                f"{where} has shape {list(shape)}; every dimension must lie in [0, {MAX_DIM}]",
                field=where,
            )
    return tuple(shape)


def decode(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, where: str
) -> np.ndarray:
    """The elements of ``tensor`` (from ``raw`` when given, else its ``contents``) as an array
    of its shape: numeric for the fixed-size datatypes, an object array of `bytes` for BYTES.
    Raw numeric data is a read-only view of ``raw``."""
    datatype = tensor.datatype
    if datatype != "BYTES" and datatype not in DTYPES:
        known = ", ".join([*DTYPES, "BYTES"])
        raise InvalidArgument(
            f"{where} has datatype {datatype!r}, which this server cannot decode; use one of "
            f"{known}",
            field=where,
        )
    shape = checked_shape(tensor.shape, where)
    count = math.prod(shape)
    if raw is not None:
        filled = [name for name in _FIELDS if getattr(tensor.contents, name)]
        if filled:
            raise InvalidArgument(
                f"{where} sends its elements twice, in raw_input_contents and in "
                f"contents.{filled[0]}; use one of them",
                field=where,
            )
        if datatype == "BYTES":
            return _object_array(_split_bytes(raw, shape, where), shape)
        itemsize = DTYPES[datatype].itemsize
        if len(raw) != count * itemsize:
            raise InvalidArgument(
                f"{where} has shape {list(shape)} of {datatype}: {count:,} elements of "
                f"{itemsize} bytes = {count * itemsize:,} bytes, but its raw_input_contents "
                f"entry holds {len(raw):,} bytes",
                field=where,
            )
        return np.frombuffer(raw, DTYPES[datatype]).reshape(shape)
    return _from_contents(tensor, datatype, shape, count, where)


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor,
    datatype: str,
    shape: tuple[int, ...],
    count: int,
    where: str,
) -> np.ndarray:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidArgument(
            f"{where}: {datatype} elements have no typed contents field; send them in "
            "raw_input_contents",
            field=where,
        )
    others = [name for name in _FIELDS if name != field and getattr(tensor.contents, name)]
    if others:
        raise InvalidArgument(
            f"{where} has datatype {datatype}, whose elements go in contents.{field} (or "
            f"raw_input_contents); this request fills contents.{others[0]}",
            field=where,
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"{where} has shape {list(shape)} ({count:,} elements) but contents.{field} holds "
            f"{len(values):,}",
            field=where,
        )
    if datatype == "BYTES":
        return _object_array(list(values), shape)
    dtype = DTYPES[datatype]
    wide = np.asarray(values, dtype=np.float64 if dtype.kind == "f" else None)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        low, high = int(wide.min()), int(wide.max())
        if low < info.min or high > info.max:
            raise InvalidArgument(
                f"{where}: {datatype} elements must lie in [{info.min}, {info.max}]; "
                f"contents.{field} holds values in [{low}, {high}]",
                field=where,
            )
    return wide.astype(dtype).reshape(shape)


def _split_bytes(raw: bytes, shape: tuple[int, ...], where: str) -> list[bytes]:
    """The length-prefixed elements of a raw BYTES buffer, as many as ``shape`` holds."""
    count = math.prod(shape)
    elements, offset = [], 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise InvalidArgument(
                f"{where}: raw BYTES element {len(elements)} is cut short in its 4-byte length "
                "prefix; each element is a little-endian uint32 length, then that many bytes",
                field=where,
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise InvalidArgument(
                f"{where}: raw BYTES element {len(elements)} declares {length:,} bytes but "
                f"only {len(raw) - offset:,} follow",
                field=where,
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
        if len(elements) > count:
            break
    if len(elements) != count:
        more = "more than " if len(elements) > count else ""
        raise InvalidArgument(
            f"{where} has shape {list(shape)} ({count:,} elements) but its "
            f"raw_input_contents entry holds {more}{len(elements):,} BYTES elements",
            field=where,
        )
    return elements


def _object_array(elements: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(shape)


def encode(
    name: str, array: np.ndarray, datatype: str
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """An output tensor's metadata and its raw little-endian bytes (numeric datatypes)."""
    data = np.ascontiguousarray(array, dtype=DTYPES[datatype])
    tensor = pb.ModelInferResponse.InferOutputTensor(
        name=name, datatype=datatype, shape=list(data.shape)
    )
    return tensor, data.tobytes()
