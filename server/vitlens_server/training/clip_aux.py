"""An optional auxiliary loss of the exemplar CLIP's training: attributes read off the image
embedding by a linear head that the export drops.

A contrastive model only learns an attribute once both towers vary with it; the demo image
tower starts blind to an object's position (benchmarks/clip_training.md), so the InfoNCE
gradient for "on the left" / "at the top" stays near zero. A cross-entropy on the image
embedding (B, E), before its normalisation (a unit vector would cap the head's logits), for the
shape, colour, position and size of single-object scenes breaks that symmetry; the captions'
contrastive loss then aligns the text tower with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitlens_server.data.captions import COLOURS, WHERE, ObjectFacts
from vitlens_server.data.shapes import CLASSES

__all__ = ["ATTRIBUTES", "attribute_head", "attribute_loss", "attribute_targets"]

# (fact field, its values): the head's logits are these blocks, in this order.
ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("shape", CLASSES),
    ("colour", tuple(COLOURS)),
    ("position", tuple(WHERE)),
    ("size", ("small", "large")),
)


def attribute_head(embed_dim: int) -> nn.Linear:
    """The linear head: (B, E) → (B, 25) logits, blocks as `ATTRIBUTES`."""
    return nn.Linear(embed_dim, sum(len(values) for _, values in ATTRIBUTES))


def attribute_targets(facts: Sequence[tuple[ObjectFacts, ...]]) -> np.ndarray:
    """(B, 4) int64 value indices per scene and attribute; -1 (ignored) for two-object scenes."""
    targets = np.full((len(facts), len(ATTRIBUTES)), -1, dtype=np.int64)
    for i, scene in enumerate(facts):
        if len(scene) == 1:
            targets[i] = [values.index(getattr(scene[0], key)) for key, values in ATTRIBUTES]
    return targets


def attribute_loss(head: nn.Module, image: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the attributes of (B, E) ``image`` for (B, 4) ``targets``;
    0 when no scene of the batch has a single object."""
    if not (targets >= 0).any():
        return image.sum() * 0.0
    logits = head(image)  # (B, 25)
    blocks = logits.split([len(values) for _, values in ATTRIBUTES], dim=1)
    losses = [
        F.cross_entropy(block, targets[:, k], ignore_index=-1) for k, block in enumerate(blocks)
    ]
    return torch.stack(losses).mean()
