"""Command-line options generated from a training config dataclass, so that a trainer's flags,
their types and their defaults are the config's fields and cannot drift from them."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["add_config_arguments", "config_from_args"]

Config = TypeVar("Config")

_PARSERS: dict[Any, Any] = {int: int, float: float, str: str, Path: Path}


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config_type: type,
    fields: Iterable[str],
    *,
    help: Mapping[str, str] | None = None,
    choices: Mapping[str, tuple[str, ...]] | None = None,
) -> None:
    """An option ``--kebab-name`` per named field of the dataclass ``config_type``, of the field's
    type and with its default: ``--flag``/``--no-flag`` for a bool, ``T | None`` parses as T."""
    hints = typing.get_type_hints(config_type)
    defaults = config_type()
    for name in fields:
        kind = _base_type(hints[name])
        option = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": getattr(defaults, name), "dest": name}
        if help and name in help:
            kwargs["help"] = help[name]
        if kind is bool:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if kind not in _PARSERS:
            raise TypeError(f"{config_type.__name__}.{name}: no option for type {kind!r}")
        if choices and name in choices:
            kwargs["choices"] = choices[name]
        parser.add_argument(option, type=_PARSERS[kind], **kwargs)


def config_from_args(
    config_type: type[Config], args: argparse.Namespace, fields: Iterable[str]
) -> Config:
    """``config_type`` with the named fields taken from parsed ``args``, the rest defaulted."""
    return config_type(**{name: getattr(args, name) for name in fields})


def _base_type(hint: Any) -> Any:
    """``T`` of ``T`` or ``T | None``."""
    options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return options[0] if len(options) == 1 else hint
