"""Resumable training state of the exemplar CLIP: one atomic ``torch.save`` file."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["config_key", "load_checkpoint", "load_weights", "save_checkpoint"]


def config_key(config: Any, ignore: Iterable[str]) -> str:
    """The fields of dataclass ``config`` that must match for a checkpoint to be resumed."""
    fields = dataclasses.asdict(config)
    for name in ignore:
        fields.pop(name)
    return json.dumps(fields, sort_keys=True, default=str)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    key: str,
    step: int,
    elapsed_s: float,
    curve: list[dict[str, Any]],
) -> None:
    """Model, optimiser, step, time, curve and torch RNG state; written atomically. Frozen
    parameters (``requires_grad`` False) are left out: a run rebuilds them (demo weights, seeded
    init), which keeps the file small."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    state = {
        "model": {k: v for k, v in model.state_dict().items() if k not in frozen},
        "optimizer": optimizer.state_dict(),
        "step": step,
        "elapsed_s": elapsed_s,
        "curve": curve,
        "rng": torch.get_rng_state(),
        "config": key,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_weights(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    """Copy checkpoint ``state``'s model weights (read from ``path``) into ``model``; only its
    frozen parameters, which `save_checkpoint` leaves out, may be missing."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if unexpected or not set(missing) <= frozen:
        raise SystemExit(f"{path} does not fit the model: missing {missing}, extra {unexpected}")


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, key: str
) -> tuple[int, float, list[dict[str, Any]]]:
    """Restore ``model``, ``optimizer`` and the RNG; ``(step, elapsed_s, curve)``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"] != key:
        raise SystemExit(f"{path} was written with other hyper-parameters ({state['config']})")
    load_weights(model, state, path)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), float(state["elapsed_s"]), list(state["curve"])
