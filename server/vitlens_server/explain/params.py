"""Method parameters: frozen dataclasses parsed from request options with precise errors."""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, get_type_hints

from vitlens_server.domain import ParamInfo
from vitlens_server.errors import InvalidArgument

__all__ = ["NoParams", "ParamInfo", "choice", "describe_params", "param", "parse_params"]

P = TypeVar("P")

_TYPE_NAMES = {float: "float", int: "int", bool: "bool", str: "str"}


@dataclass(frozen=True)
class NoParams:
    """For methods without options."""


def choice(default: Any, *choices: str, doc: str = "") -> Any:
    """A dataclass field restricted to ``choices``, documented by ``doc``."""
    return dataclasses.field(default=default, metadata={"choices": choices, "doc": doc})


def param(default: Any, doc: str, *, low: float | None = None, high: float | None = None) -> Any:
    """A documented dataclass field, optionally bounded to [low, high]."""
    return dataclasses.field(default=default, metadata={"doc": doc, "low": low, "high": high})


def parse_params(
    cls: type[P], options: Mapping[str, Any], *, method: str, kind: str = "method"
) -> P:
    """Build ``cls`` from request options, rejecting unknown names and ill-typed values.

    ``method`` names what the options belong to in error messages, ``kind`` what it is."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "none"
        raise InvalidArgument(
            f"{kind} {method!r} has no option {', '.join(map(repr, unknown))}; valid: {valid}"
        )
    values = {}
    for name, raw in options.items():
        f = fields[name]
        value = _coerce(raw, hints[name], f"{method}.{name}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise InvalidArgument(
                f"{method}.{name} must be one of {', '.join(choices)}; got {raw!r}"
            )
        low, high = f.metadata.get("low"), f.metadata.get("high")
        if (low is not None and value < low) or (high is not None and value > high):
            raise InvalidArgument(f"{method}.{name} must lie in [{low}, {high}]; got {raw!r}")
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


def _coerce(raw: Any, hint: Any, where: str) -> Any:
    if raw is None and isinstance(hint, types.UnionType) and type(None) in hint.__args__:
        return None
    kind = _base_type(hint)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
    elif kind is int:
        # protobuf Struct carries every number as a double.
        if isinstance(raw, int | float) and not isinstance(raw, bool) and float(raw).is_integer():
            return int(raw)
    elif kind is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
    elif kind is str and isinstance(raw, str):
        return raw
    raise InvalidArgument(f"{where} must be a {_TYPE_NAMES.get(kind, kind)}; got {raw!r}")
