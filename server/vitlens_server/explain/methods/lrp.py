"""Relevance-propagation methods: partial LRP and Transformer Attribution (Chefer et al. 2021).

Both read R^{A_l}, the LRP relevance at the post-softmax attention of block l (B, H, N, N), from
`vitlens_server.explain.relevance`, which propagates it from the one-hot target (the paper's start;
METHODS.md's one-hot ⊙ logits would scale each image's relevances by its logit) through the
stock timm model's captured activations. Equations write the class token's row as row 0; for
other readouts it is `Recording.readout_rows`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitlens_server.explain.params import NoParams
from vitlens_server.explain.records import Recording
from vitlens_server.explain.registry import MethodOutput, Pass, register_method
from vitlens_server.explain.relevance import attention_relevances

__all__ = ["partial_lrp", "transformer_attribution", "transformer_attribution_relevance"]


@register_method(
    "partial_lrp",
    passes=Pass.LRP,
    class_specific=True,
    relevance_matrix=True,
    description="Partial LRP (Voita et al. 2019, as a baseline in Chefer et al. 2021): LRP "
    "relevance of the last block's attention, positive part, mean over heads.",
)
def partial_lrp(rec: Recording, targets: Tensor, _params: NoParams) -> MethodOutput:
    """map = mean_h (R^{A_L})⁺[:, h, 0, P:]; relevance = mean_h (R^{A_L})⁺, (B, N, N)."""
    (last,) = attention_relevances(rec, targets, first=rec.num_layers - 1)
    fused = last.clamp(min=0).mean(dim=1)  # (B, N, N)
    return MethodOutput(rec.readout_map(fused), fused)


@torch.no_grad()
def transformer_attribution_relevance(rec: Recording, targets: Tensor) -> Tensor:
    """Transformer Attribution's (B, N, N) token relevance R for ``targets`` (B,).

    Chefer et al. CVPR 2021 §3.3, as restated in seed 003 (Eq. 13 head averaging, Eq. 6 update):
    Ā_l = mean_h((∇A_l ⊙ R^{A_l})⁺); R = I; R ← R + Ā_l·R for l = 1..L. Needs the attention
    gradients of a backward pass (``rec.attention_grad``) and a recording with LRP activations.
    """
    relevance: Tensor | None = None
    for layer, rel_attn in enumerate(attention_relevances(rec, targets)):
        weighted = (rec.attention_grad(layer) * rel_attn).clamp(min=0).mean(dim=1)  # (B, N, N)
        if relevance is None:
            eye = torch.eye(weighted.shape[-1], dtype=weighted.dtype, device=weighted.device)
            relevance = eye.expand_as(weighted).clone()
        relevance = relevance + weighted @ relevance
    return relevance


@register_method(
    "transformer_attribution",
    passes=Pass.BACKWARD | Pass.LRP,
    class_specific=True,
    relevance_matrix=True,
    description="Transformer Attribution (Chefer, Gur & Wolf, CVPR 2021): LRP relevance of every "
    "block's attention weighted by its gradient, positive part, head mean, accumulated over the "
    "blocks.",
)
def transformer_attribution(rec: Recording, targets: Tensor, _params: NoParams) -> MethodOutput:
    """map = R[0, P:] of `transformer_attribution_relevance`; relevance = R, (B, N, N)."""
    if not rec.relevance_wanted:
        return MethodOutput(rec.row_map(_readout_row(rec, targets)))
    relevance = transformer_attribution_relevance(rec, targets)
    return MethodOutput(rec.readout_map(relevance), relevance)


@torch.no_grad()
def _readout_row(rec: Recording, targets: Tensor) -> Tensor:
    """The readout row of `transformer_attribution_relevance` alone, (B, 1, N): R = Π_l
    (I + Ā_l) from the last block down, so r = w (I + Ā_L) ··· (I + Ā_1) from the left."""
    weighted = [
        (rec.attention_grad(layer) * rel_attn).clamp(min=0).mean(dim=1)  # (B, N, N)
        for layer, rel_attn in enumerate(attention_relevances(rec, targets))
    ]
    row = rec.readout_weights(weighted[0].shape[0], weighted[0].dtype)
    for step in reversed(weighted):
        row = row + rec.row_times(row, step)
    return row
