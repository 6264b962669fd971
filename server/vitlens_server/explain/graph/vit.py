"""The timm ViT classifier as an attention graph: one token set, one self-attention per block.

    sets     tokens (N = P + gh·gw; the P prefix tokens — class, registers, distillation —
             are dropped when a row is read)
    steps    self(tokens) for blocks 0 … L−1, in order
    readout  "logits" ← (tokens,): the readout's mix of rows (`Recording.readout`: the class
             token's row, the mean of the class and distillation rows for DeiT distilled, the
             mean of the patch rows for average pooling), given with each read

Only Eq. 5-6 apply, so `propagate` on this graph is `generic` (seed 003 §3, Eq. 5-6 on ViT).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

from torch import Tensor

from vitlens_server.explain.graph.declare import AttentionGraph, self_attention_graph
from vitlens_server.explain.graph.engine import LayerMaps, propagate
from vitlens_server.explain.records import Recording

__all__ = ["TOKENS", "recording_maps", "vit_graph", "vit_relevance"]

TOKENS = "tokens"


@cache
def vit_graph(num_layers: int, num_prefix_tokens: int) -> AttentionGraph:
    """The graph of a timm ViT with ``num_layers`` blocks and P = ``num_prefix_tokens``."""
    return self_attention_graph(
        TOKENS,
        num_layers,
        prefix=num_prefix_tokens,
        row=None,
        readout="logits",
        label="blocks.{}.attn",
    )


def recording_maps(rec: Recording) -> Iterator[LayerMaps]:
    """A_l and ∂y/∂A_l (B, H, N, N) of each block, computed one block at a time."""
    for layer in range(rec.num_layers):
        yield LayerMaps(rec.attention(layer), rec.attention_grad(layer))


def vit_relevance(rec: Recording) -> Tensor:
    """The engine's R^{tokens tokens} (B, N, N) for a recording with gradients, in its dtype."""
    graph = vit_graph(rec.num_layers, rec.num_prefix_tokens)
    return propagate(graph, recording_maps(rec), dtype=None).matrix(TOKENS, TOKENS)
