"""Gradient-weighted attention methods."""

from __future__ import annotations

import torch

from vitlens_server.explain.capture import Recording
from vitlens_server.explain.methods.attention import cls_row_map
from vitlens_server.explain.params import NoParams
from vitlens_server.explain.registry import MethodOutput, Pass, register_method

__all__ = ["generic"]


@register_method(
    "generic",
    passes=Pass.BACKWARD,
    class_specific=True,
    relevance_matrix=True,
    description="Generic attention explainability (Chefer, Gur & Wolf, ICCV 2021, Eq. 5-6): "
    "gradient-weighted attention accumulated over the blocks.",
)
def generic(rec: Recording, _params: NoParams) -> MethodOutput:
    """Ā_l = mean_h((∇A_l ⊙ A_l)⁺); R = I; R ← R + Ā_l·R for l = 1..L; map = R[0, P:]."""
    relevance: torch.Tensor | None = None
    for layer in range(rec.num_layers):
        weighted = (rec.attention_grad(layer) * rec.attention(layer)).clamp(min=0).mean(dim=1)
        if relevance is None:
            eye = torch.eye(weighted.shape[-1], dtype=weighted.dtype, device=weighted.device)
            relevance = eye.expand_as(weighted).clone()  # (B, N, N)
        relevance = relevance + weighted @ relevance
    return MethodOutput(cls_row_map(relevance, rec), relevance)
