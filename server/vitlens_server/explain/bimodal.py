"""Explanations of bi-modal VQA models: relevance of the question's tokens and the image's tokens.

One forward pass records every attention map the model declares (`BimodalModel.record`); each
target rank then takes one backward pass for the whole batch (items do not interact, so the sum
of the items' target logits gives each item its own ∂y/∂A), and the method turns the maps into
relevance matrices over the model's `AttentionGraph`, read at the answer token (seed 003 §3.2:
the joint sequence's classification row split into text and image for single-stream models;
the CLS rows of R^{tt} and R^{ti} for two-stream ones):

    generic                  Eq. 5-11 (`explain.graph.propagate`): Ā = mean_h((∇A ⊙ A)⁺)
    generic (averaging=lrp)  the same rules with Eq. 13's averaging, Ā = mean_h((∇A ⊙ R^A)⁺)
    raw_attention            the last map of each pair, head mean (`graph.raw_attention`)
    rollout                  rollout on self-attention, Eq. 12 on co-attention pairs
    partial_lrp              the last map of each pair's LRP relevance (R^A)⁺, head mean
    transformer_attribution  Eq. 13 with Eq. 6 on self-attention, the last pair map by Eq. 13
                             (`graph.attribution`)
    gradcam                  the last map of each pair weighted per head by its mean gradient,
                             positive part (`graph.gradcam`)

R^A, the LRP relevance of each map, comes from `explain.bimodal_lrp` (Chefer et al. 2021's
rules through the model's layers, from the target's one-hot logits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vitlens_server.explain.bimodal_lrp import attention_relevances
from vitlens_server.explain.graph import (
    AttentionGraph,
    GraphRelevance,
    LayerMaps,
    attribution,
    gradcam,
    partial_lrp,
    propagate,
    raw_attention,
    rollout,
)
from vitlens_server.explain.passes import raise_if_interrupted
from vitlens_server.models.bimodal import BimodalInputs, BimodalModel, BimodalTokens
from vitlens_server.models.bimodal.lrp_taps import record_lrp

__all__ = [
    "BIMODAL_METHODS",
    "BimodalExplanation",
    "BimodalMethod",
    "explain_bimodal",
    "resolve_targets",
]

GraphMethod = Callable[[AttentionGraph, Sequence[LayerMaps]], GraphRelevance]


@dataclass(frozen=True)
class BimodalMethod:
    """A method of bi-modal models: what it reads and how it makes relevance matrices.

    Attributes:
        name: the request's method key.
        description: one line with the paper it comes from.
        gradient: reads ∂y/∂A (one backward pass per target rank).
        lrp: reads R^A, the LRP relevance of every map.
        class_specific: depends on the explained answer.
        combine: (graph, per-edge maps) → relevance; the maps carry (A or R^A, ∂y/∂A).
    """

    name: str
    description: str
    gradient: bool
    lrp: bool
    class_specific: bool
    combine: GraphMethod


BIMODAL_METHODS: dict[str, BimodalMethod] = {
    m.name: m
    for m in (
        BimodalMethod(
            "generic",
            "Chefer, Gur & Wolf (ICCV 2021) Eq. 5-11 over the model's attention graph: "
            "self-attention and co-attention updates from gradient-weighted attention, read at "
            "the answer token (option averaging=lrp: Eq. 13's LRP-weighted averaging)",
            gradient=True,
            lrp=False,
            class_specific=True,
            combine=propagate,
        ),
        BimodalMethod(
            "raw_attention",
            "the last attention map of each kind (self, co-attention), head mean, at the "
            "answer token; not answer-specific",
            gradient=False,
            lrp=False,
            class_specific=False,
            combine=raw_attention,
        ),
        BimodalMethod(
            "rollout",
            "attention rollout (Abnar & Zuidema 2020) on self-attention, seed 003 Eq. 12 on "
            "co-attention; not answer-specific",
            gradient=False,
            lrp=False,
            class_specific=False,
            combine=rollout,
        ),
        BimodalMethod(
            "partial_lrp",
            "partial LRP (Voita et al. 2019, a baseline of seed 003): the last attention "
            "map of each kind's LRP relevance, positive part, head mean",
            gradient=False,
            lrp=True,
            class_specific=True,
            combine=partial_lrp,
        ),
        BimodalMethod(
            "transformer_attribution",
            "Transformer Attribution (Chefer, Gur & Wolf, CVPR 2021) as seed 003 runs it on "
            "bi-modal models: mean_h((dy/dA * R^A)+) accumulated over self-attention, the last "
            "co-attention map averaged the same way",
            gradient=True,
            lrp=True,
            class_specific=True,
            combine=attribution,
        ),
        BimodalMethod(
            "gradcam",
            "Grad-CAM on the last attention map of each kind (as seed 003 adapts it): heads "
            "weighted by their mean gradient, head mean, ReLU",
            gradient=True,
            lrp=False,
            class_specific=True,
            combine=gradcam,
        ),
    )
}


@dataclass(frozen=True)
class BimodalExplanation:
    """One batch explained at K target ranks.

    Attributes:
        logits: (B, A) answer logits.
        targets: (B, K) the explained answer of each item at each rank.
        text: (B, K, T) relevance of each text position (0 at CLS, SEP, padding).
        image: (B, K, M) relevance of each image token (patch slot or region; 0 at padding).
        tokens: the batch's token bookkeeping (grid cells, valid tokens).
        matrices: per rank, every relevance matrix, when asked for; else None.
    """

    logits: Tensor
    targets: Tensor
    text: Tensor
    image: Tensor
    tokens: BimodalTokens
    matrices: tuple[GraphRelevance, ...] | None = None


Targets = Tensor | Callable[[Tensor], Tensor] | None


def resolve_targets(logits: Tensor, targets: Targets, top_k: int) -> Tensor:
    """(B, K) answers to explain: ``targets`` ((B,) or (B, K), or a function of the (B, A)
    logits giving them) or, for None, the ``top_k`` most probable."""
    if targets is None:
        return logits.topk(top_k, dim=1).indices
    if callable(targets):
        targets = targets(logits)
    targets = targets.to(logits.device).long()
    return targets[:, None] if targets.dim() == 1 else targets


def explain_bimodal(
    model: BimodalModel,
    inputs: BimodalInputs,
    method: BimodalMethod,
    *,
    targets: Targets = None,
    top_k: int = 1,
    averaging: str = "gradient",
    matrices: bool = False,
    interrupted: Callable[[], bool] | None = None,
) -> BimodalExplanation:
    """Explain ``inputs`` with ``method``: one forward pass, one backward pass per target rank.

    Args:
        targets: (B,) or (B, K) answer indices, or a function of the (B, A) logits giving
            them; None: the ``top_k`` predicted answers.
        averaging: ``"gradient"`` (Eq. 5) or ``"lrp"`` (Eq. 13) head averaging for generic.
        matrices: keep every relevance matrix (`BimodalExplanation.matrices`).
        interrupted: checked before each rank's backward pass; true: stop
            (`explain.passes.raise_if_interrupted`).
    """
    if averaging not in ("gradient", "lrp"):
        raise ValueError(f"averaging must be 'gradient' or 'lrp', got {averaging!r}")
    use_lrp = method.lrp or (method.name == "generic" and averaging == "lrp")
    recorder = record_lrp(model) if use_lrp else model.record()
    with torch.enable_grad(), recorder as recording:
        logits = model(inputs)  # (B, A)
        chosen = resolve_targets(logits.detach(), targets, top_k)  # (B, K)
        tokens = recording.tokens
        assert tokens is not None
        graph = model.graph(tokens)
        rows = torch.arange(len(chosen), device=logits.device)
        texts, images, kept = [], [], []
        ranks = chosen.shape[1]
        for rank in range(ranks):
            raise_if_interrupted(interrupted)
            scores = logits[rows, chosen[:, rank]]  # (B,)
            if method.gradient:
                layers = recording.layer_maps(scores, retain_graph=rank < ranks - 1)
            else:
                layers = [LayerMaps(a.detach()) for a in recording.maps]
            if use_lrp:
                layers = _with_lrp(model, recording, chosen[:, rank], layers)
            relevance = method.combine(graph, layers)
            text, image = model.readout(relevance, tokens)
            texts.append(text)
            images.append(image)
            if matrices:
                kept.append(relevance)
    return BimodalExplanation(
        logits=logits.detach(),
        targets=chosen,
        text=torch.stack(texts, dim=1),
        image=torch.stack(images, dim=1),
        tokens=tokens,
        matrices=tuple(kept) if matrices else None,
    )


def _with_lrp(
    model: BimodalModel, recording, targets: Tensor, layers: list[LayerMaps]
) -> list[LayerMaps]:
    """``layers`` with each map A replaced by its LRP relevance R^A (gradients kept)."""
    relevances = attention_relevances(model, recording, targets)
    return [LayerMaps(r, m.gradient) for r, m in zip(relevances, layers, strict=True)]
