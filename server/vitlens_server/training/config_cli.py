"""Command-line options generated from a training config dataclass, so that a trainer's flags,
their types and their defaults are the config's fields and cannot drift from them; and the
options every resumable trainer shares (`add_run_arguments`, `start_run`)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "RunArguments",
    "add_config_arguments",
    "add_run_arguments",
    "config_from_args",
    "start_run",
]

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


@dataclass(frozen=True)
class RunArguments:
    """How a trainer was asked to run: ``command`` as its metadata records it, ``resume``
    from its checkpoint, and stop (checkpointed) after ``max_seconds`` (None: never)."""

    command: str
    resume: bool
    max_seconds: float | None


def add_run_arguments(parser: argparse.ArgumentParser, checkpoint: str) -> None:
    """``--threads``, ``--resume`` (from ``checkpoint``, as the help names it) and
    ``--max-minutes``."""
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--resume", action="store_true", help=f"continue from {checkpoint}")
    parser.add_argument("--max-minutes", type=float, help="checkpoint and stop after this long")


def start_run(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str] | None
) -> RunArguments:
    """Log to stderr with times, use ``--threads`` torch threads if given, and record the
    command line (``parser.prog`` and ``argv``, or the process's own arguments)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = f"{parser.prog} {shlex.join(sys.argv[1:] if argv is None else argv)}".rstrip()
    max_seconds = None if args.max_minutes is None else args.max_minutes * 60
    return RunArguments(command, args.resume, max_seconds)


def _base_type(hint: Any) -> Any:
    """``T`` of ``T`` or ``T | None``."""
    options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return options[0] if len(options) == 1 else hint
