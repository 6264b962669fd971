"""Relevance over declared attention graphs (Chefer, Gur & Wolf, ICCV 2021; seed 003 §3-4).

A model declares its token sets, its attention layers in forward order and where its answer is
read (`declare`); `propagate` applies the paper's update rules (`rules`) to the maps and
gradients of one batch; `baselines` holds §4's raw attention, rollout (Eq. 12) and Transformer
Attribution over the same graphs; `vit` is the timm ViT classifier's graph.
"""

from vitlens_server.explain.graph.baselines import (
    attribution,
    gradcam,
    partial_lrp,
    raw_attention,
    rollout,
)
from vitlens_server.explain.graph.declare import (
    AttentionEdge,
    AttentionGraph,
    EdgeKind,
    Readout,
    Step,
    TokenSet,
    bi,
    cross,
    self_attention,
    self_attention_graph,
)
from vitlens_server.explain.graph.engine import GraphRelevance, LayerMaps, propagate, read_rows

__all__ = [
    "AttentionEdge",
    "AttentionGraph",
    "EdgeKind",
    "GraphRelevance",
    "LayerMaps",
    "Readout",
    "Step",
    "TokenSet",
    "attribution",
    "bi",
    "cross",
    "gradcam",
    "partial_lrp",
    "propagate",
    "raw_attention",
    "read_rows",
    "rollout",
    "self_attention",
    "self_attention_graph",
]
