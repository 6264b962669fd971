"""Seed 003 §4's baselines for multi-modal models, over the same declared graphs as the engine.

Each takes a graph and its maps (`LayerMaps`, one per edge of ``graph.edges``, consumed lazily)
and returns a `GraphRelevance`, read as the engine's (`GraphRelevance.read`). Pairs are those
the graph creates (`AttentionGraph.pairs`): (x, x) per set, (q, k) per bi or cross edge.

    raw_attention   R^{xx} = mean_h A of the last self-attention layer over x; R^{qk} = mean_h A
                    of the last layer q ← k ("the last attention map of the relevant kind")
    rollout         R^{xx} = Ã_n ··· Ã_1 over the self-attention layers of x, in order, with
                    Ã = norm_rows(mean_h A + I) (Abnar & Zuidema); R^{qk} = (R^{qq})ᵀ·Ā·R^{kk}
                    (Eq. 12) with Ā = mean_h A of the last layer q ← k and the rollout R^{qq},
                    R^{kk} of the whole forward pass
    attribution     Transformer Attribution as seed 003 runs it on bi-modal models: Eq. 13
                    averaging (pass R^A, the LRP relevance of A, as ``attention``) with Eq. 6
                    on every self-attention layer of x; R^{qk} = the last layer q ← k averaged
                    by Eq. 13
    gradcam         Grad-CAM on the last layer of each pair, as the seed's code adapts it to
                    attention: R = (mean_h w_h·A_h)⁺ with w_h = the mean of ∂y/∂A_h over all
                    its entries (one weight per head)

    partial_lrp     `raw_attention` of (R^A)⁺ (pass R^A as ``attention``): the last layer's
                    positive LRP relevance, head mean

A set that no layer of the kind reaches keeps R^{xx} = I; a pair no edge reaches stays 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from vitlens_server.explain.graph.declare import AttentionEdge, AttentionGraph
from vitlens_server.explain.graph.engine import GraphRelevance, LayerMaps
from vitlens_server.explain.graph.rules import head_mean, identity, paired_relevance

__all__ = ["attribution", "gradcam", "partial_lrp", "raw_attention", "rollout"]


@torch.no_grad()
def raw_attention(
    graph: AttentionGraph,
    maps: Iterable[LayerMaps],
    *,
    dtype: torch.dtype | None = torch.float32,
) -> GraphRelevance:
    """Last map of each pair, head mean, (B, |x|, |y|) per pair; gradients are not read."""
    last: dict[tuple[str, str], Tensor] = {}
    for edge, layer in _walk(graph, maps):
        last[edge.queries, edge.keys] = _cast(layer.attention, dtype).mean(dim=1)
    return _result(graph, last)


def partial_lrp(
    graph: AttentionGraph,
    maps: Iterable[LayerMaps],
    *,
    dtype: torch.dtype | None = torch.float32,
) -> GraphRelevance:
    """`raw_attention` of the positive part of R^A, given as each map's ``attention``."""
    return raw_attention(graph, (LayerMaps(m.attention.clamp(min=0)) for m in maps), dtype=dtype)


@torch.no_grad()
def rollout(
    graph: AttentionGraph,
    maps: Iterable[LayerMaps],
    *,
    dtype: torch.dtype | None = torch.float32,
) -> GraphRelevance:
    """Rollout on self-attention, Eq. 12 on the pairs of bi and cross layers; no gradients."""
    selves: dict[str, Tensor] = {}
    last: dict[tuple[str, str], Tensor] = {}
    for edge, layer in _walk(graph, maps):
        fused = _cast(layer.attention, dtype).mean(dim=1)  # (B, q, k)
        if edge.kind == "self":
            eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
            augmented = fused + eye
            augmented = augmented / augmented.sum(dim=-1, keepdim=True)
            found = selves.get(edge.queries)
            selves[edge.queries] = augmented if found is None else augmented @ found
        else:
            last[edge.queries, edge.keys] = fused
    matrices: dict[tuple[str, str], Tensor] = {(x, x): m for x, m in selves.items()}
    for (q, k), fused in last.items():
        queries_self = selves.get(q, identity(fused.shape[0], fused.shape[1], fused))
        keys_self = selves.get(k, identity(fused.shape[0], fused.shape[2], fused))
        matrices[q, k] = paired_relevance(queries_self, fused, keys_self)
    return _result(graph, matrices)


@torch.no_grad()
def attribution(
    graph: AttentionGraph,
    maps: Iterable[LayerMaps],
    *,
    dtype: torch.dtype | None = torch.float32,
) -> GraphRelevance:
    """Eq. 6 with Eq. 13 averaging on self layers; the last q ← k map by Eq. 13 on pairs.

    ``maps`` carry R^A (the LRP relevance of A) as ``attention`` and ∂y/∂A as ``gradient``.
    """
    matrices: dict[tuple[str, str], Tensor] = {}
    for edge, layer in _walk(graph, maps):
        if layer.gradient is None:
            raise ValueError(f"{edge.describe()}: Eq. 13 needs ∂y/∂A")
        weighted = head_mean(_cast(layer.attention, dtype), _cast(layer.gradient, dtype))
        pair = (edge.queries, edge.keys)
        if edge.kind != "self":
            matrices[pair] = weighted
            continue
        found = matrices.get(pair)
        if found is None:
            found = identity(weighted.shape[0], weighted.shape[-1], weighted)
        matrices[pair] = found + weighted @ found
    return _result(graph, matrices)


@torch.no_grad()
def gradcam(
    graph: AttentionGraph,
    maps: Iterable[LayerMaps],
    *,
    dtype: torch.dtype | None = torch.float32,
) -> GraphRelevance:
    """Last map of each pair weighted per head by its mean gradient, head mean, positive part."""
    last: dict[tuple[str, str], Tensor] = {}
    for edge, layer in _walk(graph, maps):
        if layer.gradient is None:
            raise ValueError(f"{edge.describe()}: Grad-CAM needs ∂y/∂A")
        attention, gradient = _cast(layer.attention, dtype), _cast(layer.gradient, dtype)
        weights = gradient.mean(dim=(2, 3), keepdim=True)  # (B, h, 1, 1)
        last[edge.queries, edge.keys] = (weights * attention).mean(dim=1).clamp(min=0)
    return _result(graph, last)


def _walk(
    graph: AttentionGraph, maps: Iterable[LayerMaps]
) -> Iterator[tuple[AttentionEdge, LayerMaps]]:
    """(edge, maps) in forward order; the maps must match the edges one to one."""
    supplied = iter(maps)
    for edge in graph.edges:
        layer = next(supplied, None)
        if layer is None:
            raise ValueError(f"maps ran out before {edge.describe()}")
        if layer.attention.dim() != 4:
            raise ValueError(f"{edge.describe()}: A must be (B, h, q, k)")
        yield edge, layer
    if next(supplied, None) is not None:
        raise ValueError(f"more maps than the graph's {len(graph.edges)} edges")


def _result(graph: AttentionGraph, matrices: dict[tuple[str, str], Tensor]) -> GraphRelevance:
    sizes: dict[str, int] = {}
    for (x, y), matrix in matrices.items():
        sizes[x], sizes[y] = matrix.shape[1], matrix.shape[2]
    return GraphRelevance(graph, matrices, sizes)


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor if dtype is None else tensor.to(dtype)
