"""Transformer Attribution for image-text pairs: LRP through each tower from the pair's logit.

Chefer, Gur & Wolf (CVPR 2021) with the rules of `explain.relevance` (their α = 1, β = 0 rule
for linear layers, the z-rule for A·V and Q·Kᵀ, the conserving skip-connection rule, norms and
activations passed through), started at the similarity logit instead of a class logit:

    y = s · ⟨e_img, e_txt⟩ with unit embeddings e = u / |u|, u = P · pool(norm(tokens))

    start      R = 1 at y; the tower's side of the dot product is a linear layer with the
               weight s · e_other (the other tower's unit embedding, fixed): α1β0 gives R_e
    normalise  e = u / |u|: passed through, like a norm (R_u = R_e)
    project    α1β0 through P (bias not in the denominator), to the pooled token
    pool       the class token (image) / each text's EOT token (text) receives it all
    blocks     `relevance.block_relevance` on each block, with the tower's activations
               (`TowerRecording.blocks`) and weights (`ImageTextModel.lrp_weights`)

R^{A_l} (n, h, N, N) of every layer; Transformer Attribution is then the graph engine's
`attribution` (Eq. 13 head averaging Ā = mean_h((∇A ⊙ R^A)⁺) with Eq. 6, R ← R + Ā·R), read at
the readout row. ``nn.MultiheadAttention`` never exposes O = A·V, so it is rebuilt from the
recorded q, k, v and mask (exactly what the module computes, up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

from vitlens_server.explain.graph import LayerMaps, attribution
from vitlens_server.explain.image_text_methods import TowerView, tower_graph
from vitlens_server.explain.relevance import block_relevance, linear_relevance
from vitlens_server.models.image_text import ImageTextModel, TowerRecording

__all__ = ["PairLrp", "attention_relevances", "transformer_attribution"]


@dataclass(frozen=True)
class PairLrp:
    """What LRP reads besides a round's tower: the model and both sides of each dot product.

    Attributes:
        model: the adapter (its LRP weights).
        own: (n, D) unit embeddings of the round's items in this tower.
        other: (n, D) unit embeddings of their partners in the other tower.
    """

    model: ImageTextModel
    own: Tensor
    other: Tensor


class _BlockView:
    """A tower as the `explain.records.Recording` that `relevance.block_relevance` reads."""

    def __init__(self, tower: TowerRecording, weights: list[dict[str, Tensor]]) -> None:
        self._tower = tower
        self.layers = tower.layers  # q, k, v per layer
        self.num_heads = tower.graph.num_heads
        self.scale = tower.layers[0].scale
        blocks = [
            SimpleNamespace(
                attn=SimpleNamespace(
                    qkv=SimpleNamespace(weight=w["qkv"]), proj=SimpleNamespace(weight=w["proj"])
                ),
                mlp=SimpleNamespace(
                    fc1=SimpleNamespace(weight=w["fc1"]), fc2=SimpleNamespace(weight=w["fc2"])
                ),
            )
            for w in weights
        ]
        acts = [self._complete(i, block) for i, block in enumerate(tower.blocks or [])]
        self.lrp = SimpleNamespace(layers=acts, blocks=blocks)

    def attention(self, layer: int) -> Tensor:
        return self._tower.attention(layer)

    def _complete(self, layer: int, block):
        if block.proj_in is not None:
            return block
        rec = self._tower.layers[layer]
        out = self.attention(layer) @ rec.v.to(torch.float32)  # (n, h, N, d) = A·V
        n, h, t, d = out.shape
        proj_in = out.transpose(1, 2).reshape(n, t, h * d).to(block.x.dtype)
        return SimpleNamespace(**{**vars(block), "proj_in": proj_in})


@torch.no_grad()
def attention_relevances(tower: TowerRecording, pair: PairLrp) -> list[Tensor]:
    """R^{A_l} for every layer l of ``tower`` (input side first), each (n, h, N, N)."""
    if tower.blocks is None or tower.head_in is None:
        raise RuntimeError("Transformer Attribution needs a capture with lrp=True")
    model = pair.model
    weights, projection = model.lrp_weights(tower.graph.tower)
    scale = model.logit_scale.exp().to(pair.own)
    start = torch.ones(1, dtype=pair.own.dtype, device=pair.own.device)
    embedded = torch.stack(
        [
            linear_relevance(pair.own[i], (scale * pair.other[i])[None], start)
            for i in range(len(pair.own))
        ]
    )  # (n, D): the dot product's α1β0 rule, then e = u/|u| passed through
    rows = tower.read_rows.argmax(dim=-1)  # (n,) the class / EOT token
    batch = torch.arange(len(rows), device=rows.device)
    head_in = tower.head_in.float()
    pooled = head_in if head_in.dim() == 2 else head_in[batch, rows]  # (n, W)
    relevance = torch.zeros(*tower.read_rows.shape, pooled.shape[-1], device=pooled.device)
    relevance[batch, rows] = linear_relevance(pooled, projection.float(), embedded)
    view = _BlockView(tower, [{k: v.float() for k, v in w.items()} for w in weights])
    found: list[Tensor] = []
    for layer in reversed(range(tower.num_layers)):
        relevance, rel_attn = block_relevance(view, layer, relevance)  # type: ignore[arg-type]
        found.append(rel_attn)
    return found[::-1]


def transformer_attribution(view: TowerView, pair: PairLrp) -> tuple[Tensor, Tensor]:
    """Transformer Attribution of a round's tower: ((n, *grid) readout-row maps, (n, N, N) R)."""
    tower = view.tower
    g = tower.graph
    graph = tower_graph(g.tower, tower.num_layers, g.num_prefix_tokens)
    maps = (
        LayerMaps(rel_attn, view.attention_grad(layer))
        for layer, rel_attn in enumerate(attention_relevances(tower, pair))
    )
    relevance = attribution(graph, maps).matrix(g.tower, g.tower)  # (n, N, N)
    return view.readout_map(relevance), relevance
