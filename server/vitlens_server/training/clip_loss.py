"""The exemplar CLIP's contrastive loss: symmetric InfoNCE where a caption may be true of
several images of the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["contrastive_loss"]


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, positives: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with several positives: unit embeddings image (B, E), text (B, E),
    log-temperature () and positives (B, B) bool (``[i, j]``: text j describes image i; the
    diagonal is true). Each direction's target spreads evenly over the positives."""
    logits = logit_scale.exp() * image @ text.T  # (B, B)
    targets = positives.float()
    image_to_text = -(F.log_softmax(logits, 1) * targets / targets.sum(1, keepdim=True)).sum(1)
    text_to_image = -(F.log_softmax(logits, 0) * targets / targets.sum(0, keepdim=True)).sum(0)
    return (image_to_text.mean() + text_to_image.mean()) / 2
