"""Options generated from a config dataclass: names, types, defaults, booleans, unknown types;
the run options every trainer shares."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vitlens_server.training.config_cli import (
    add_config_arguments,
    add_run_arguments,
    config_from_args,
    start_run,
)


@dataclass(frozen=True)
class _Config:
    out: Path = Path("build/x")
    steps: int = 10
    lr: float = 1e-3
    device: str = "cpu"
    export_dir: Path | None = None
    crisp: bool = True
    shape: tuple[int, int] = (1, 2)


_FIELDS = ("out", "steps", "lr", "device", "export_dir", "crisp")


def _parse(argv: list[str]) -> _Config:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Config, _FIELDS, choices={"device": ("cpu", "cuda")})
    return config_from_args(_Config, parser.parse_args(argv), _FIELDS)


def test_no_arguments_give_the_defaults():
    assert _parse([]) == _Config()


def test_options_are_kebab_case_and_typed():
    config = _parse(["--steps", "7", "--lr", "0.5", "--export-dir", "a/b", "--out", "c"])
    assert (config.steps, config.lr, config.export_dir, config.out) == (
        7,
        0.5,
        Path("a/b"),
        Path("c"),
    )
    assert isinstance(config.steps, int) and isinstance(config.lr, float)


def test_booleans_take_a_no_form_and_choices_are_enforced():
    assert _parse(["--no-crisp"]).crisp is False
    assert _parse(["--crisp"]).crisp is True
    with pytest.raises(SystemExit):
        _parse(["--device", "tpu"])
    with pytest.raises(SystemExit):
        _parse(["--steps", "many"])


def test_a_field_of_an_unsupported_type_is_refused_by_name():
    with pytest.raises(TypeError, match=r"_Config\.shape"):
        add_config_arguments(argparse.ArgumentParser(), _Config, ["shape"])


def test_run_options_record_the_command_and_set_the_threads():
    parser = argparse.ArgumentParser(prog="python -m trainer")
    add_config_arguments(parser, _Config, _FIELDS)
    add_run_arguments(parser, "<out>/x.ckpt")
    argv = ["--steps", "5", "--threads", "1", "--max-minutes", "1.5", "--resume"]
    before = torch.get_num_threads()
    try:
        run = start_run(parser, parser.parse_args(argv), argv)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert run.command == "python -m trainer --steps 5 --threads 1 --max-minutes 1.5 --resume"
    assert run.resume and run.max_seconds == 90.0
    idle = start_run(parser, parser.parse_args([]), [])  # no --threads: torch's own, untouched
    assert torch.get_num_threads() == before
    assert not idle.resume and idle.max_seconds is None and idle.command == "python -m trainer"
    assert "<out>/x.ckpt" in parser.format_help()
