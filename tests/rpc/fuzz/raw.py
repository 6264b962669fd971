"""Fuzz strategy for raw bytes: valid messages cut, flipped and spliced, deep Structs and
hand-made wire formats sent with identity serializers (`tests.rpc.fuzz`)."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import Message
from hypothesis import strategies as st

from tests.rpc.fuzz.basics import (
    Catalog,
)
from tests.rpc.fuzz.requests import explain_requests, predict_requests
from vitlens.v1 import tensor_pb2, vitlens_pb2

M = TypeVar("M", bound=Message)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# --------------------------------------------------------------------------- Explain, Predict


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
        explain_requests(catalog).map(lambda shown: shown.message.SerializeToString()),
        predict_requests(catalog).map(lambda shown: shown.message.SerializeToString()),
    )
    return st.one_of(
        st.binary(max_size=64),
        st.sampled_from(KNOWN_BAD_PAYLOADS),
        seeds.flatmap(mutated),
    )
