"""Exact maximum flow on the layered attention graph of Abnar & Zuidema (2020), compiled by numba.

The graph has nodes (l, i) for layers l = 0..L and tokens i = 0..N-1, and an edge
(l-1, j) → (l, i) of capacity C[l-1, i, j] for every l = 1..L (C[l-1] is Ã_l of `attention_flow`).
For a source (0, s) and a set R of sink tokens in layer L, joined by infinite-capacity edges to a
super-sink, the value asked for is

    flow(s) = max { |f| : f a flow from (0, s) to R }  = min cut  (max-flow/min-cut theorem).

The solver is Dinic's algorithm (BFS level graph + blocking flow by depth-first search with current
arcs) on float64 residuals, specialised to the layered structure: the graph is never built; the
residual of the forward arc (l, j) → (l+1, i) lives in ``fwd[l, j, i]`` and that of its reverse
(the flow on it) in ``bwd[l, i, j]``, so both directions are contiguous row scans. What can never
carry flow is never visited: layer-0 nodes other than the source have no incoming arc, and the
edges into layer-L nodes outside R are removed before the search, so the only layer-L nodes the
search reaches are sinks. Zero-capacity edges (discarded attention) are skipped by the residual
test.

Tolerance: an arc counts as present when its residual exceeds ``tol`` (1e-14 of the largest
capacity by default, above float64 rounding of values ≤ 1 and far below the answer's scale). At
termination every arc leaving the source side S of the last residual search has residual ≤ tol,
so |f| ≥ cap(S, T) − tol · (edges across the cut) ≥ maxflow − tol · L · N², about 5e-9 of the
largest capacity for ViT-B/16 (L = 12, N = 197). Every augmentation saturates its bottleneck arc
exactly (r − r = 0), so the usual termination argument (≤ V phases, finite blocking flows) holds.

The kernels hold no Python objects and release the GIL (``nogil=True``); `max_flow_values` runs
the independent (image, source) problems on a thread pool, so it is safe to call from several
threads at once whatever numba's threading layer is. Compilation (a few seconds) is cached on disk
(``cache=True``); `warm_up` pays it ahead of the first request.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

__all__ = ["DEFAULT_TOL", "max_flow_values", "warm_up"]

DEFAULT_TOL = 1e-14  # relative to the largest capacity


@numba.njit(cache=True, nogil=True)
def _bfs_levels(fwd, bwd, source, level, queue, tol):  # pragma: no cover - compiled
    """Label nodes by residual distance from ``source``; return the sinks' level (-1: none).

    Stops once the first sink's level is known and every node below it is labelled, so only
    nodes on shortest augmenting paths (and their level peers) carry a label.
    """
    layers, n, _ = fwd.shape
    level[:] = -1
    level[source] = 0
    queue[0] = source
    head, tail = 0, 1
    sink_level = -1
    while head < tail:
        u = queue[head]
        head += 1
        lu = level[u]
        if sink_level >= 0 and lu >= sink_level:
            break
        layer = u // n
        i = u - layer * n
        if layer < layers:  # forward arcs (layer, i) → (layer+1, k)
            base = (layer + 1) * n
            row = fwd[layer, i]
            for k in range(n):
                if row[k] > tol and level[base + k] < 0:
                    level[base + k] = lu + 1
                    queue[tail] = base + k
                    tail += 1
                    if layer + 1 == layers and sink_level < 0:
                        sink_level = lu + 1
        if layer > 0:  # backward arcs (layer, i) → (layer-1, k), residual = flow on the edge
            base = (layer - 1) * n
            row = bwd[layer - 1, i]
            for k in range(n):
                if row[k] > tol and level[base + k] < 0:
                    level[base + k] = lu + 1
                    queue[tail] = base + k
                    tail += 1
    return sink_level


@numba.njit(cache=True, nogil=True)
def _blocking_flow(fwd, bwd, dirty, source, sink_level, level, cur, stack, tol):  # pragma: no cover
    """Saturate every shortest augmenting path (Dinic's phase); return the flow added.

    Rows of ``fwd`` / ``bwd`` it changes are flagged in ``dirty`` (2, L, N) for the reset.
    """
    layers, n, _ = fwd.shape
    cur[:] = 0
    stack[0] = source
    depth = 0
    added = 0.0
    while True:
        u = stack[depth]
        layer = u // n
        if layer == layers:  # reached a sink: augment along the stack by its bottleneck
            bottleneck = np.inf
            for d in range(depth):
                a = stack[d]
                la = a // n
                ia = a - la * n
                k = cur[a]
                r = fwd[la, ia, k] if k < n else bwd[la - 1, ia, k - n]
                bottleneck = min(bottleneck, r)
            first_saturated = 0
            found = False
            for d in range(depth):
                a = stack[d]
                la = a // n
                ia = a - la * n
                k = cur[a]
                if k < n:
                    fwd[la, ia, k] -= bottleneck
                    bwd[la, k, ia] += bottleneck
                    dirty[0, la, ia] = dirty[1, la, k] = True
                    r = fwd[la, ia, k]
                else:
                    j = k - n
                    bwd[la - 1, ia, j] -= bottleneck
                    fwd[la - 1, j, ia] += bottleneck
                    dirty[0, la - 1, j] = dirty[1, la - 1, ia] = True
                    r = bwd[la - 1, ia, j]
                if not found and r <= tol:
                    first_saturated = d
                    found = True
            added += bottleneck
            depth = first_saturated  # resume from the tail of the first saturated arc
            continue
        lu = level[u]
        i = u - layer * n
        k = cur[u]
        nxt = -1
        if k < n:  # forward arcs; into layer L only sinks are left with capacity
            base = (layer + 1) * n
            row = fwd[layer, i]
            to_sink = layer + 1 == layers
            while k < n:
                if row[k] > tol and level[base + k] == lu + 1 and (to_sink or lu + 1 < sink_level):
                    nxt = base + k
                    break
                k += 1
        if nxt < 0 and layer > 0 and lu + 1 < sink_level:  # backward arcs
            if k < n:
                k = n
            base = (layer - 1) * n
            row = bwd[layer - 1, i]
            while k < 2 * n:
                if row[k - n] > tol and level[base + k - n] == lu + 1:
                    nxt = base + k - n
                    break
                k += 1
        if nxt >= 0:
            cur[u] = k
            depth += 1
            stack[depth] = nxt
        else:  # dead end: no shortest path goes through u any more
            cur[u] = 2 * n
            level[u] = -1
            if depth == 0:
                return added
            depth -= 1
            cur[stack[depth]] += 1


@numba.njit(cache=True, nogil=True)
def _solve(capacity_t, sources, jobs, out, tol):  # pragma: no cover - compiled
    """Max-flow value for each job index (b · S + s) in ``jobs``, written to ``out`` (B, S).

    ``capacity_t`` (B, L, N, N) holds capacity_t[b, l, j, i] = capacity of (l, j) → (l+1, i),
    with the edges into non-sink layer-L nodes already zeroed.
    """
    _, layers, n, _ = capacity_t.shape
    nodes = (layers + 1) * n
    fwd = np.empty((layers, n, n))
    bwd = np.empty((layers, n, n))
    dirty = np.zeros((2, layers, n), np.bool_)  # rows of fwd, bwd that differ from the start
    level = np.empty(nodes, np.int64)
    queue = np.empty(nodes, np.int64)
    cur = np.empty(nodes, np.int64)
    stack = np.empty(nodes + 1, np.int64)
    count = sources.shape[0]
    current = -1
    for job in jobs:
        b = job // count
        s = job - b * count
        if b != current:  # a new graph: copy it whole
            fwd[:] = capacity_t[b]
            bwd[:] = 0.0
            dirty[:] = False
            current = b
        else:  # the same graph: reset only the rows the last flow changed
            for layer in range(layers):
                for i in range(n):
                    if dirty[0, layer, i]:
                        fwd[layer, i] = capacity_t[b, layer, i]
                    if dirty[1, layer, i]:
                        bwd[layer, i] = 0.0
            dirty[:] = False
        total = 0.0
        previous = 0
        while True:
            sink_level = _bfs_levels(fwd, bwd, sources[s], level, queue, tol)
            if sink_level < 0:
                break
            if sink_level <= previous:  # Dinic: each phase lengthens the shortest path
                raise RuntimeError("max-flow phase did not lengthen the shortest path")
            previous = sink_level
            total += _blocking_flow(fwd, bwd, dirty, sources[s], sink_level, level, cur, stack, tol)
        out[b, s] = total


def max_flow_values(
    capacity: np.ndarray,
    sources: np.ndarray,
    sinks: np.ndarray,
    *,
    threads: int | None = None,
    tol: float = DEFAULT_TOL,
) -> np.ndarray:
    """Maximum flow from each source (0, s) to the sink set (L, R) of each layered graph.

    Args:
        capacity: (B, L, N, N) non-negative capacities; capacity[b, l-1, i, j] is that of the
            edge (l-1, j) → (l, i) of graph b (row i of Ã_l receives from column j).
        sources: (S,) token indices s of the source nodes (0, s).
        sinks: (K,) token indices r of the sink nodes (L, r), fed to one super-sink.
        threads: worker threads (default: the CPUs this process may use).
        tol: residuals at or below ``tol · max(capacity)`` count as zero; the result is within
            ``tol · max(capacity) · L · N²`` below the exact value (see the module docstring).

    Returns:
        (B, S) float64 flow values.
    """
    capacity = np.asarray(capacity, dtype=np.float64)
    if capacity.ndim != 4 or capacity.shape[-1] != capacity.shape[-2] or capacity.shape[1] < 1:
        raise ValueError(f"capacity must be (B, L, N, N) with L >= 1; got {capacity.shape}")
    if not np.isfinite(capacity).all() or (capacity < 0).any():
        raise ValueError("capacities must be finite and non-negative")
    batch, _, n, _ = capacity.shape
    sources = np.asarray(sources, dtype=np.int64).reshape(-1)
    sinks = np.asarray(sinks, dtype=np.int64).reshape(-1)
    for name, index in (("sources", sources), ("sinks", sinks)):
        if ((index < 0) | (index >= n)).any():
            raise ValueError(f"{name} must lie in [0, {n}); got {index.tolist()}")
    # (B, L, N, N) with [b, l, j, i] = capacity of (l, j) → (l+1, i); no edges into non-sinks.
    capacity_t = np.ascontiguousarray(capacity.transpose(0, 1, 3, 2))
    not_sink = np.ones(n, dtype=bool)
    not_sink[sinks] = False
    capacity_t[:, -1][..., not_sink] = 0.0
    out = np.zeros((batch, sources.shape[0]))
    scale = float(capacity.max(initial=0.0))
    if out.size == 0 or scale == 0.0 or sinks.size == 0:
        return out
    jobs = np.arange(out.size, dtype=np.int64)
    workers = max(1, min(threads or _usable_cpus(), jobs.size))
    if workers == 1:
        _solve(capacity_t, sources, jobs, out, tol * scale)
        return out
    # Small chunks: flows differ in cost, so a thread that is done early picks up more work.
    chunks = np.array_split(jobs, min(jobs.size, 4 * workers))
    with ThreadPoolExecutor(workers, thread_name_prefix="maxflow") as pool:
        for done in [
            pool.submit(_solve, capacity_t, sources, chunk, out, tol * scale) for chunk in chunks
        ]:
            done.result()
    return out


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def warm_up() -> float:
    """Compile (or load from numba's disk cache) the kernels; return the seconds it took."""
    start = time.perf_counter()
    capacity = np.full((1, 2, 3, 3), 0.5)
    max_flow_values(capacity, np.arange(3), np.array([0]), threads=1)
    return time.perf_counter() - start
