"""Fuzz strategy basics: the server's catalog, which fields to mutate, hostile strings and
Struct option values (`tests.rpc.fuzz`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

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
