"""A training aid for the exemplar DETR: the first decoder layer's cross-attention is asked to
look inside the box of the object its query is matched to.

DETR's cross-attention starts near uniform, so a query's state is the mean of the whole image
and its box sits at a fixed place (benchmarks/detr_training.md, runs 1-3: boxes at the image
centre, mAP@0.5 about 0.02 after 48k scenes). This loss gives the attention a spatial target:
for each query the Hungarian matcher pairs with an object (the loss's own matching, recomputed
without gradient), the cross-entropy between the uniform distribution over the token cells whose
centres lie inside the object's box and the head-mean attention row of that query in the
*first* decoder layer. The last layer — what ``raw_attention`` reads — and every later layer are
left to the detection loss alone. Training only: the exported model is a stock DETR.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from transformers.loss.loss_for_object_detection import HungarianMatcher

__all__ = ["attention_prior_loss", "matched_pairs"]

_MATCHER = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)  # DetrConfig's defaults


@torch.no_grad()
def matched_pairs(logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]):
    """Per image (queries (m,), objects (m,)) of the Hungarian matching DETR's loss makes."""
    outputs = {"logits": logits.detach().float(), "pred_boxes": boxes.detach().float()}
    return _MATCHER(outputs, targets)


def attention_prior_loss(
    attention: Tensor,
    pairs: list[tuple[Tensor, Tensor]],
    boxes: tuple[np.ndarray, ...],
    size: int,
) -> Tensor:
    """Mean over matched (query, object) of −Σ_n t_n log Ā_qn.

    Args:
        attention: (B, h, Q, N) the first decoder layer's cross-attention, N = gh·gw square.
        pairs: `matched_pairs`' output.
        boxes: per image its objects' (K, 4) pixel boxes (x1, y1, x2, y2).
        size: the images' side in pixels.
    """
    side = round(attention.shape[-1] ** 0.5)
    centres = (torch.arange(side, device=attention.device) + 0.5) * (size / side)  # (g,)
    losses = []
    for b, (queries, objects) in enumerate(pairs):
        if len(queries) == 0:
            continue
        box = torch.as_tensor(boxes[b], device=attention.device)[objects.to(attention.device)]
        x1, y1, x2, y2 = (box[:, i, None] for i in range(4))  # (m, 1) each
        inside_x = (centres >= x1) & (centres < x2)  # (m, g)
        inside_y = (centres >= y1) & (centres < y2)
        target = (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1).float()  # (m, N)
        target = target / target.sum(1, keepdim=True).clamp(min=1)
        rows = attention[b].float().mean(0)[queries.to(attention.device)]  # (m, N)
        losses.append(-(target * rows.clamp(min=1e-8).log()).sum(1))
    if not losses:
        return attention.new_zeros(())
    return torch.cat(losses).mean()
