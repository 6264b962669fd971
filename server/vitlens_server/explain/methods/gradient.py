"""Gradient-weighted attention methods."""

from __future__ import annotations

from torch import Tensor

from vitlens_server.explain.graph.vit import vit_relevance
from vitlens_server.explain.params import NoParams
from vitlens_server.explain.records import Recording
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
def generic(rec: Recording, _targets: Tensor, _params: NoParams) -> MethodOutput:
    """Ā_l = mean_h((∇A_l ⊙ A_l)⁺); R = I; R ← R + Ā_l·R for l = 1..L; map = R[0, P:].

    The attention-graph engine on the ViT's graph (one token set, a self-attention layer per
    block: `vitlens_server.explain.graph.vit`), in the recording's dtype.
    """
    relevance = vit_relevance(rec)  # (B, N, N)
    return MethodOutput(rec.readout_map(relevance), relevance)


@register_method(
    "gradcam",
    passes=Pass.BACKWARD,
    class_specific=True,
    description="Grad-CAM adapted to ViT as in Chefer et al. 2021: last block's class-token "
    "attention weighted per head by its mean gradient.",
)
def gradcam(rec: Recording, _targets: Tensor, _params: NoParams) -> MethodOutput:
    """α_h = mean_j ∇A_L[h, 0, P+j]; map = ReLU(mean_h α_h · A_L[h, 0, P:])."""
    last = rec.num_layers - 1
    attn = rec.readout_rows(rec.attention(last))  # (B, H, gh·gw)
    weights = rec.readout_rows(rec.attention_grad(last)).mean(dim=-1, keepdim=True)  # (B, H, 1)
    heatmap = (weights * attn).mean(dim=1).clamp(min=0)
    return MethodOutput(heatmap.reshape(-1, *rec.grid))


@register_method(
    "agcam",
    passes=Pass.BACKWARD,
    class_specific=True,
    description="Attention-guided CAM (Leem & Seo, AAAI 2024): positive attention gradients of "
    "every block, weighted by sigmoid-normalised attention scores, summed over heads and blocks.",
)
def agcam(rec: Recording, _targets: Tensor, _params: NoParams) -> MethodOutput:
    """map = Σ_l Σ_h ReLU(∇A_l[h, 0, P:]) ⊙ sigmoid(S_l[h, 0, P:])."""
    heatmap = None
    for layer in range(rec.num_layers):
        grads = rec.readout_rows(rec.attention_grad(layer)).clamp(min=0)  # (B, H, gh·gw)
        scores = rec.readout_rows(rec.scores(layer)).sigmoid()
        term = (grads * scores).sum(dim=1)
        heatmap = term if heatmap is None else heatmap + term
    return MethodOutput(heatmap.reshape(-1, *rec.grid))
