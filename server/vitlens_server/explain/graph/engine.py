"""The attention-graph relevance engine: seed 003's rules over any declared `AttentionGraph`.

`propagate(graph, maps)` walks the graph's steps in forward order. ``maps`` holds one
`LayerMaps` per edge of ``graph.edges`` — the attention map A (B, h, q, k) and its gradient
∂y/∂A of the same shape — and is consumed lazily, one edge at a time, so a generator that
computes each layer's maps on demand keeps one layer's maps in memory at once.

    start   R^{xx} = I for every set, R^{xy} = 0 for x ≠ y (Eq. 1-2; zero matrices are not
            stored: a pair is kept from the first layer that mixes y into x)
    each    Ā = mean_h((∇A ⊙ A)⁺)  (Eq. 5; LRP variant, Eq. 13: R^A given as A)
    self x  R^{xx} ← R^{xx} + Ā·R^{xx};  R^{xk} ← R^{xk} + Ā·R^{xk} for every kept R^{xk}
    bi q←k  R^{qk} ← R^{qk} + (R̄^{qq})ᵀ·Ā·R̄^{kk};  R^{qq} ← R^{qq} + Ā·R^{kq}   (Eq. 10-11)
    cross   R^{qk} ← R^{qk} + (R̄^{qq})ᵀ·Ā·R̄^{kk}                                (Eq. 10)

Every edge of a step reads the relevances as they were before the step, and the step's
additions are summed (LXMERT's co-attention both ways, as the authors' code computes it).
R̄ and the zero-row rule: `vitlens_server.explain.graph.rules`.

Everything runs batched over B on the maps' device; ``dtype`` (float32 by default, float64
allowed) is the dtype the maps are cast to before Eq. 5 — None computes in the maps' own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from vitlens_server.explain.graph.declare import AttentionEdge, AttentionGraph
from vitlens_server.explain.graph.rules import bi_addition, head_mean, identity, self_addition

__all__ = ["GraphRelevance", "LayerMaps", "propagate", "read_rows"]

Pair = tuple[str, str]


class LayerMaps(NamedTuple):
    """One edge's tensors: A (or R^A for Eq. 13) and ∂y/∂A, both (B, h, |queries|, |keys|).

    ``gradient`` may be None only for the baselines that read attention alone.
    """

    attention: Tensor
    gradient: Tensor | None = None


@dataclass(frozen=True)
class GraphRelevance:
    """The relevance matrices one `propagate` call produced.

    Attributes:
        graph: the graph they belong to.
        matrices: R^{xy} (B, |x|, |y|) per ordered pair (x, y) the forward pass created: every
            (x, x) of a set some edge touched and every (q, k) some layer mixed; pairs the
            graph declares but no layer reached are zero (`matrix` makes them).
        sizes: |x| per set the maps showed.
    """

    graph: AttentionGraph
    matrices: Mapping[Pair, Tensor]
    sizes: Mapping[str, int]

    def matrix(self, queries: str, keys: str) -> Tensor:
        """R^{queries keys}, (B, |queries|, |keys|): I or 0 where no layer reached the pair."""
        found = self.matrices.get((queries, keys))
        if found is not None:
            return found
        if (queries, keys) not in self.graph.pairs:
            raise KeyError(f"the graph creates no relevance R^({queries},{keys})")
        if not self.matrices:
            raise ValueError("no attention layer ran: nothing to read")
        like = next(iter(self.matrices.values()))
        rows, cols = self._size(queries), self._size(keys)
        if queries == keys:
            return identity(like.shape[0], rows, like)
        return like.new_zeros(like.shape[0], rows, cols)

    def read(self, name: str, rows: int | Tensor | None = None) -> dict[str, Tensor]:
        """The readout ``name``'s row of R^{q k} for each of its key sets k, as {k: (B, ...)}.

        ``rows`` overrides the readout's row (and is required where it declares none): see
        `read_rows`. Each key set's prefix tokens are dropped from its columns.
        """
        readout = self.graph.readout(name)
        rows = readout.row if rows is None else rows
        if rows is None:
            raise ValueError(f"readout {name!r} declares no row: pass rows")
        return {
            key: read_rows(self.matrix(readout.queries, key), rows)[
                ..., self.graph.token_set(key).prefix :
            ]
            for key in readout.keys
        }

    def _size(self, name: str) -> int:
        size = self.sizes.get(name, self.graph.token_set(name).size)
        if size is None:
            raise ValueError(f"no layer showed the size of token set {name!r}")
        return size


def read_rows(matrix: Tensor, rows: int | Tensor) -> Tensor:
    """Rows of a (B, q, k) relevance matrix.

    ``rows``: an int (the same row for every input) → (B, k); an integer tensor (B,) (one row
    per input: an EOT position, a detection) → (B, k), or (B, K) → (B, K, k); a floating tensor
    of row weights, (q,) or (B, q) (a mix of rows: DeiT's two heads, average pooling) →
    (B, k) = Σ_m w_m R[m].
    """
    if isinstance(rows, int):
        return matrix[:, rows]
    if rows.is_floating_point():
        weights = rows.to(device=matrix.device, dtype=matrix.dtype)
        pattern = "m,bmk->bk" if weights.dim() == 1 else "bm,bmk->bk"
        return torch.einsum(pattern, weights, matrix)
    rows = rows.to(matrix.device)
    batch = torch.arange(matrix.shape[0], device=matrix.device)
    return matrix[batch[:, None], rows] if rows.dim() == 2 else matrix[batch, rows]


@torch.no_grad()
def propagate(
    graph: AttentionGraph,
    maps: Iterable[LayerMaps],
    *,
    dtype: torch.dtype | None = torch.float32,
) -> GraphRelevance:
    """All relevance matrices of ``graph`` for one batch.

    Args:
        graph: the model's declared attention graph.
        maps: one `LayerMaps` per edge of ``graph.edges``, in that order, each with a gradient.
        dtype: cast the maps to this dtype first; None: compute in the maps' dtype.

    Raises:
        ValueError: a map of the wrong shape, a missing gradient, or too few or too many maps.
    """
    state = _State(graph)
    supplied: Iterator[LayerMaps] = iter(maps)
    for step in graph.steps:
        additions: list[tuple[Pair, Tensor]] = []
        for edge in step:
            additions += state.updates(edge, state.weighted(edge, next(supplied, None), dtype))
        state.apply(additions)
    if next(supplied, None) is not None:
        raise ValueError(f"more maps than the graph's {len(graph.edges)} edges")
    return GraphRelevance(graph, dict(state.matrices), dict(state.sizes))


class _State:
    """The relevance matrices while a graph is walked; a missing off-diagonal pair is zero."""

    def __init__(self, graph: AttentionGraph) -> None:
        self.graph = graph
        self.matrices: dict[Pair, Tensor] = {}
        self.sizes: dict[str, int] = {}
        self.batch: int | None = None

    def weighted(
        self, edge: AttentionEdge, layer: LayerMaps | None, dtype: torch.dtype | None
    ) -> Tensor:
        """Ā (B, q, k) of one edge's checked maps (Eq. 5); the maps are not kept."""
        if layer is None:
            raise ValueError(f"maps ran out before {edge.describe()}")
        if layer.gradient is None:
            raise ValueError(f"{edge.describe()}: the engine needs ∂y/∂A")
        attention, gradient = _cast(layer, dtype)
        self.check(edge, attention, gradient)
        return head_mean(attention, gradient)

    def check(self, edge: AttentionEdge, attention: Tensor, gradient: Tensor) -> None:
        """Shapes: A and ∂y/∂A (B, h, |q|, |k|), B and the set sizes as seen so far."""
        if attention.dim() != 4 or gradient.shape != attention.shape:
            raise ValueError(
                f"{edge.describe()}: A and ∂y/∂A must both be (B, h, q, k); got "
                f"{tuple(attention.shape)} and {tuple(gradient.shape)}"
            )
        batch, _, rows, cols = attention.shape
        if self.batch is None:
            self.batch = batch
        elif batch != self.batch:
            raise ValueError(f"{edge.describe()}: batch {batch}, earlier layers {self.batch}")
        for name, size in ((edge.queries, rows), (edge.keys, cols)):
            known = self.sizes.get(name, self.graph.token_set(name).size)
            if known is not None and known != size:
                raise ValueError(f"{edge.describe()}: set {name!r} has {known} tokens, map {size}")
            self.sizes[name] = size

    def self_matrix(self, name: str, like: Tensor) -> Tensor:
        """R^{xx}, I (kept from here on) until a layer updates it."""
        found = self.matrices.get((name, name))
        if found is None:
            found = self.matrices[name, name] = identity(like.shape[0], self.sizes[name], like)
        return found

    def updates(self, edge: AttentionEdge, weighted: Tensor) -> list[tuple[Pair, Tensor]]:
        """(pair, ΔR) of one edge with Ā (B, q, k), computed from the current state."""
        q, k = edge.queries, edge.keys
        if edge.kind == "self":  # Eq. 6 on R^{qq}, Eq. 7 on every kept R^{qk}
            found = [((q, q), self.self_matrix(q, weighted))]
            found += [(pair, m) for pair, m in self.matrices.items() if pair[0] == q != pair[1]]
            return [(pair, self_addition(weighted, m)) for pair, m in found]
        mixed, back = bi_addition(
            weighted,
            self.self_matrix(q, weighted),
            self.self_matrix(k, weighted),
            self.matrices.get((k, q)) if edge.kind == "bi" else None,
        )
        return [((q, k), mixed)] + ([] if back is None else [((q, q), back)])

    def apply(self, additions: list[tuple[Pair, Tensor]]) -> None:
        """R ← R + ΔR for every addition of a step (R^{xx} from I, R^{xy} from 0)."""
        for pair, addition in additions:
            current = self.matrices.get(pair)  # R^{xx} is there: updates() made it
            self.matrices[pair] = addition if current is None else current + addition


def _cast(layer: LayerMaps, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    attention, gradient = layer.attention, layer.gradient
    if dtype is None:
        return attention, gradient
    return attention.to(dtype), gradient.to(dtype)
