"""Conversion between `vitlens.v1.Tensor` messages and numpy arrays.

A `Tensor` on the wire is dense, row-major (C order) and little-endian, with exactly
``prod(shape) * itemsize`` bytes of data. Both the SDK and the server use these two functions,
so they depend on numpy and protobuf only.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from vitlens.v1 import tensor_pb2

__all__ = [
    "TensorFormatError",
    "numpy_dtype",
    "numpy_to_tensor",
    "proto_dtype",
    "tensor_to_numpy",
]

# Wire dtype -> little-endian numpy dtype.
_TO_NUMPY: dict[int, np.dtype] = {
    tensor_pb2.DTYPE_UINT8: np.dtype("<u1"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
}
# numpy dtype (native or little-endian, compared by kind and size) -> wire dtype.
_FROM_NUMPY: dict[str, int] = {
    "u1": tensor_pb2.DTYPE_UINT8,
    "f2": tensor_pb2.DTYPE_FLOAT16,
    "f4": tensor_pb2.DTYPE_FLOAT32,
}
# Dtypes converted without being asked: float64 -> float32, bool -> uint8.
_IMPLICIT_CASTS: dict[str, np.dtype] = {
    "f8": np.dtype(np.float32),
    "b1": np.dtype(np.uint8),
}


MAX_DIMS = 32  # numpy's own limit is 64
MAX_DIM = 2**31 - 1  # the longest dimension


class TensorFormatError(ValueError):
    """A `Tensor` message is malformed: unknown dtype, negative dimension or wrong byte count."""


def _key(dtype: np.dtype) -> str:
    return f"{dtype.kind}{dtype.itemsize}"


def numpy_dtype(dtype: int) -> np.dtype:
    """The little-endian numpy dtype of a wire `Dtype` value.

    Raises:
        TensorFormatError: for DTYPE_UNSPECIFIED or a value this version does not know.
    """
    try:
        return _TO_NUMPY[dtype]
    except KeyError:
        if dtype == tensor_pb2.DTYPE_UNSPECIFIED:
            raise TensorFormatError("tensor dtype is DTYPE_UNSPECIFIED") from None
        raise TensorFormatError(f"unknown tensor dtype {dtype}") from None


def proto_dtype(dtype: DTypeLike) -> int:
    """The wire `Dtype` value of a numpy dtype (uint8, float16 or float32).

    Raises:
        TypeError: for any other dtype.
    """
    dt = np.dtype(dtype)
    try:
        return _FROM_NUMPY[_key(dt)]
    except KeyError:
        raise TypeError(f"dtype {dt} cannot be sent; use uint8, float16 or float32") from None


def tensor_to_numpy(t: tensor_pb2.Tensor, *, copy: bool = True) -> np.ndarray:
    """Decode a `Tensor` message into an array of shape ``tuple(t.shape)``.

    Args:
        t: the message. An empty shape is a scalar (a 0-d array); a zero dimension gives an empty
            array with no data bytes.
        copy: True (the default) returns a new, writable array in native byte order that owns
            its memory. False returns a read-only little-endian view over ``t.data`` (no copy);
            it keeps the bytes alive but must not be written to.

    Raises:
        TensorFormatError: DTYPE_UNSPECIFIED or unknown dtype, more than `MAX_DIMS` dimensions,
            a negative dimension or one above `MAX_DIM`, a shape numpy cannot hold, or a data
            length other than ``prod(shape) * itemsize``.
    """
    dtype = numpy_dtype(t.dtype)
    if len(t.shape) > MAX_DIMS:
        raise TensorFormatError(f"tensor has {len(t.shape)} dimensions; at most {MAX_DIMS}")
    shape = tuple(int(d) for d in t.shape)
    if any(d < 0 for d in shape):
        raise TensorFormatError(f"tensor shape {shape} has a negative dimension")
    if any(d > MAX_DIM for d in shape):
        raise TensorFormatError(f"tensor shape {shape} has a dimension above {MAX_DIM:,}")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if len(t.data) != expected:
        raise TensorFormatError(
            f"tensor of shape {shape} and dtype {dtype.name} needs {expected} bytes, "
            f"got {len(t.data)}"
        )
    try:
        view = np.frombuffer(t.data, dtype=dtype).reshape(shape)
    except ValueError as err:  # numpy cannot index the shape (even with no elements)
        raise TensorFormatError(f"tensor shape {shape} cannot be held: {err}") from None
    if not copy:
        return view
    return view.astype(dtype.newbyteorder("="), order="C", copy=True)


def numpy_to_tensor(a: ArrayLike, dtype: DTypeLike | None = None) -> tensor_pb2.Tensor:
    """Encode an array as a `Tensor` message (row-major, little-endian).

    Args:
        a: array-like of any shape, including 0-d (scalar) and empty.
        dtype: wire element type, one of uint8, float16 or float32; ``a`` is cast to it.
            None keeps ``a``'s dtype when it is one of those three, casts float64 to float32
            and bool to uint8 (0/1).

    Raises:
        TypeError: ``dtype`` (or, when None, ``a``'s dtype) cannot be sent.
    """
    arr = np.asarray(a)
    if dtype is None:
        target = _IMPLICIT_CASTS.get(_key(arr.dtype), arr.dtype)
        if _key(target) not in _FROM_NUMPY:
            raise TypeError(
                f"arrays of dtype {arr.dtype} cannot be sent; use uint8, float16 or float32, "
                "or pass dtype= to cast"
            )
    else:
        target = np.dtype(dtype)
    wire = proto_dtype(target)
    little = np.dtype(target).newbyteorder("<")
    data = np.ascontiguousarray(arr, dtype=little).tobytes(order="C")
    return tensor_pb2.Tensor(dtype=wire, shape=arr.shape, data=data)
