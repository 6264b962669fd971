"""`vitlens serve` settings from flags, environment variables and a TOML file.

Every flag has an environment variable and a config-file key of the same name:
``--max-batch-size 64``, ``VITLENS_MAX_BATCH_SIZE=64`` and ``max_batch_size = 64`` (or
``max-batch-size``) are the same setting. Precedence: flags, then the environment, then the file
(``--config FILE`` or ``VITLENS_CONFIG``), then the defaults. Repeatable flags (``--model``,
``--dataset-root``) take a list in the file and a comma-separated list in the environment.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ENV_PREFIX", "SettingsError", "parse_settings"]

ENV_PREFIX = "VITLENS_"


class SettingsError(ValueError):
    """A config file or environment variable that cannot be used; the message says which."""


def parse_settings(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    environ: Mapping[str, str] = os.environ,
) -> argparse.Namespace:
    """Parse ``argv`` with defaults taken from the config file and the environment."""
    parser.add_argument(
        "--config",
        type=Path,
        default=environ.get(f"{ENV_PREFIX}CONFIG"),
        help=f"TOML file of settings (keys as the flags, e.g. max_batch_size = 64); also "
        f"${ENV_PREFIX}CONFIG. Every flag also reads ${ENV_PREFIX}<FLAG> (e.g. "
        f"{ENV_PREFIX}MAX_BATCH_SIZE). Flags win over the environment, which wins over the file.",
    )
    first, _ = parser.parse_known_args(argv)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    defaults: dict[str, Any] = {}
    if first.config is not None:
        defaults.update(_from_file(Path(first.config), actions))
    defaults.update(_from_environment(environ, actions))
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def _from_file(path: Path, actions: Mapping[str, argparse.Action]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise SettingsError(f"cannot read config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(f"config file {path} is not valid TOML: {err}") from None
    values = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            raise SettingsError(
                f"config file {path}: unknown setting {key!r}; valid settings: "
                f"{', '.join(sorted(actions))}"
            )
        values[dest] = _convert(actions[dest], value, f"{path}: {key}")
    return values


def _from_environment(
    environ: Mapping[str, str], actions: Mapping[str, argparse.Action]
) -> dict[str, Any]:
    values = {}
    for dest, action in actions.items():
        name = f"{ENV_PREFIX}{dest.upper()}"
        if name in environ:
            raw: Any = environ[name]
            if action.nargs == 0:  # store_true flags: 1/true/yes
                raw = raw.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(action, argparse._AppendAction):
                raw = [part.strip() for part in raw.split(",") if part.strip()]
            values[dest] = _convert(action, raw, name)
    return values


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """A file or environment value as the flag's parser would have made it."""
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(action, item, where) for item in items]
    return _convert_one(action, value, where)


def _convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, bool) or action.type is None:
        converted = value
    else:
        try:
            converted = action.type(value)
        except (TypeError, ValueError) as err:
            raise SettingsError(f"{where}: {value!r} is not valid ({err})") from None
    if action.choices is not None and converted not in action.choices:
        raise SettingsError(f"{where}: {converted!r} is not one of {', '.join(action.choices)}")
    return converted
