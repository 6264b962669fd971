"""Method parameters: frozen dataclasses parsed from request options with precise errors."""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, get_type_hints

from vitlens_server.domain import ParamInfo
from vitlens_server.errors import InvalidArgument, clip

__all__ = ["NoParams", "ParamInfo", "choice", "describe_params", "param", "parse_params"]

P = TypeVar("P")

_TYPE_NAMES = {float: "float", int: "int", bool: "bool", str: "str"}


@dataclass(frozen=True)
class NoParams:
    """For methods without options."""


def choice(default: Any, *choices: str, doc: str = "") -> Any:
    """A dataclass field restricted to ``choices``, documented by ``doc``."""
    return dataclasses.field(default=default, metadata={"choices": choices, "doc": doc})


def param(default: Any, doc: str, *, low: float, high: float) -> Any:
    """A documented dataclass field bounded to [low, high]: every number a request can set has
    a range, so no value, however large, reaches the math unchecked."""
    return dataclasses.field(default=default, metadata={"doc": doc, "low": low, "high": high})


def parse_params(
    cls: type[P],
    options: Mapping[str, Any],
    *,
    method: str,
    kind: str = "method",
    field: str | None = None,
) -> P:
    """Build ``cls`` from request options, rejecting unknown names and ill-typed, non-finite,
    out-of-range or unlisted values.

    ``method`` names what the options belong to in error messages, ``kind`` what it is;
    ``field`` is the options' path in the request (errors name ``field.<option>``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "none"
        named = ", ".join(clip(name, 60) for name in unknown[:5])
        raise InvalidArgument(
            f"{kind} {clip(method)} has no option {named}; valid: {valid}", field=field
        )
    values = {}
    for name, raw in options.items():
        f = fields[name]
        where = f"{method}.{name}"
        path = None if field is None else f"{field}.{name}"
        value = _coerce(raw, hints[name], where, path)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise InvalidArgument(
                f"{where} must be one of {', '.join(choices)}; got {clip(raw)}", field=path
            )
        low, high = f.metadata.get("low"), f.metadata.get("high")
        if (low is not None and value < low) or (high is not None and value > high):
            raise InvalidArgument(
                f"{where} must lie in [{low}, {high}]; got {clip(raw)}", field=path
            )
        values[name] = value
    return cls(**values)


def describe_params(cls: type) -> list[ParamInfo]:
    """Public description of a parameter dataclass, for ``ModelInfo.methods``."""
    hints = get_type_hints(cls)
    return [
        ParamInfo(
            name=f.name,
            type=_TYPE_NAMES.get(_base_type(hints[f.name]), "str"),
            default_json=json.dumps(f.default),
            description=f.metadata.get("doc", ""),
            choices=tuple(f.metadata.get("choices", ())),
        )
        for f in dataclasses.fields(cls)
    ]


def _base_type(hint: Any) -> type:
    if isinstance(hint, types.UnionType):  # ``int | None`` → int
        return next(t for t in hint.__args__ if t is not type(None))
    return hint


def _coerce(raw: Any, hint: Any, where: str, path: str | None) -> Any:
    if raw is None and isinstance(hint, types.UnionType) and type(None) in hint.__args__:
        return None
    kind = _base_type(hint)
    number = isinstance(raw, int | float) and not isinstance(raw, bool)
    if number and kind in (int, float) and not math.isfinite(raw):
        raise InvalidArgument(f"{where} must be a finite number; got {clip(raw)}", field=path)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
    elif kind is int:
        # protobuf Struct carries every number as a double.
        if number and float(raw).is_integer():
            return int(raw)
    elif kind is float:
        if number:
            return float(raw)
    elif kind is str and isinstance(raw, str):
        return raw
    raise InvalidArgument(
        f"{where} must be a {_TYPE_NAMES.get(kind, kind)}; got {clip(raw)}", field=path
    )
