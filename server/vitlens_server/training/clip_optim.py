"""What the exemplar CLIP's training updates, and how fast: frozen parts, AdamW groups and the
learning-rate schedule of a `vitlens_server.training.clip_train.ClipTrainConfig`."""

from __future__ import annotations

import math
from typing import Any

import open_clip
import torch
from torch import nn

__all__ = ["freeze", "hold_trunk", "is_trunk", "lr_factor", "make_optimizer", "trunk_parameters"]


def freeze(model: open_clip.CLIP, config: Any) -> None:
    """Freeze the patch/position embeddings and the first ``frozen_blocks`` blocks of the
    image tower (autograd then skips their backward), and the token embedding unless
    ``train_token_embedding`` (its dense (49408, W) gradient and update cost more than the rest
    of the text tower; the captions' few dozen tokens keep their random vectors)."""
    visual = model.visual
    frozen: list[nn.Module | nn.Parameter] = []
    if config.frozen_blocks:
        frozen += [visual.conv1, visual.class_embedding, visual.positional_embedding]
        frozen += list(visual.transformer.resblocks[: config.frozen_blocks])
    if not config.train_token_embedding:
        frozen.append(model.token_embedding)
    for item in frozen:
        item.requires_grad_(False)


def is_trunk(name: str) -> bool:
    """Whether parameter ``name`` belongs to the pretrained image trunk (its projection is new)."""
    return name.startswith("visual.") and name != "visual.proj"


def trunk_parameters(model: open_clip.CLIP) -> list[nn.Parameter]:
    """The image trunk's trainable parameters (call after `freeze`), for `hold_trunk`."""
    return [p for n, p in model.named_parameters() if is_trunk(n) and p.requires_grad]


def hold_trunk(trunk: list[nn.Parameter], config: Any, step: int) -> None:
    """Hold the ``trunk`` parameters still before ``step`` while it is below
    ``visual_hold_steps``: ``requires_grad_(False)``, so that autograd skips the trunk's backward
    while the text tower learns to read the demo tower's features as they are. A checkpoint
    written meanwhile leaves them out, as it does `freeze`'s parameters: apply the hold of
    step 0 before loading one."""
    for param in trunk:
        param.requires_grad_(step >= config.visual_hold_steps)


def make_optimizer(model: open_clip.CLIP, config: Any) -> torch.optim.AdamW:
    """Groups by rate and decay: the image trunk at ``visual_lr`` (its projection is new: full
    rate) but its position embedding at ``position_lr``, the temperature at ``logit_scale_lr``,
    the rest at ``lr``; no decay for 1-d tensors, embeddings and the temperature. Frozen
    parameters are left out."""
    groups: dict[tuple[bool, float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        trunk = is_trunk(name)
        lr = config.visual_lr if trunk else config.lr
        lr = config.position_lr if name == "visual.positional_embedding" else lr
        lr = config.logit_scale_lr if name == "logit_scale" else lr
        decay = param.ndim > 1 and "embedding" not in name
        groups.setdefault((trunk, lr, decay), []).append(param)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": config.weight_decay if decay else 0.0,
                "base_lr": lr,
                "trunk": trunk,
            }
            for (trunk, lr, decay), params in sorted(groups.items())
        ],
        lr=config.lr,
    )


def lr_factor(config: Any, step: int, trunk: bool = False) -> float:
    """Linear warmup, then cosine down to ``min_lr_fraction``; for the image ``trunk``, 0 during
    ``visual_hold_steps`` and a warmup of its own after them."""
    hold = config.visual_hold_steps if trunk else 0
    if step < hold:
        return 0.0
    warm = min(1.0, (step - hold + 1) / max(1, config.warmup_steps))
    return warm * _cosine(config, step)


def _cosine(config: Any, step: int) -> float:
    """The cosine part of the schedule: 1 until the end of warmup, ``min_lr_fraction`` at the
    end."""
    progress = max(0, step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps)
    floor = config.min_lr_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
