"""AdamW with a pretrained trunk: the parameter groups the exemplar trainers share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["trunk_adamw"]


def trunk_adamw(
    model: nn.Module,
    config: Any,
    is_trunk: Callable[[str], bool],
    no_decay: tuple[str, ...],
) -> torch.optim.AdamW:
    """AdamW groups: parameters where ``is_trunk(name)`` at ``config.trunk_lr``, the rest at
    ``config.lr`` (each group's ``base_lr``, for the schedule); ``config.weight_decay`` except
    for 1-d tensors and names containing any of ``no_decay``. Frozen parameters are left out."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decay = param.ndim > 1 and not any(part in name for part in no_decay)
            groups.setdefault((is_trunk(name), decay), []).append(param)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": config.weight_decay if decay else 0.0,
                "base_lr": config.trunk_lr if trunk else config.lr,
            }
            for (trunk, decay), params in sorted(groups.items())
        ],
        lr=config.lr,
    )
