"""attention_flow against networkx's maximum flow, hand-computed cuts and its properties.

References build Ã from timm's *unfused* attention maps (tests/tiny.py) with numpy loops and the
graph node by node, so capture, head fusion, discarding and the solver are all checked.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from tests.tiny import tiny_loaded, tiny_vit, unfused_attention_and_grads
from vitlens_server.errors import InvalidArgument
from vitlens_server.explain import Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.maxflow import max_flow_values
from vitlens_server.explain.methods.flow import FlowParams
from vitlens_server.explain.params import parse_params
from vitlens_server.explain.recording import record

SINK = "super-sink"


def _nx_flow(capacity: np.ndarray, source: int, sinks: list[int]) -> float:
    """Max flow (0, source) → super-sink fed by (L, r), r in sinks, with infinite capacity.

    ``capacity`` (L, N, N): capacity[l-1, i, j] is that of the edge (l-1, j) → (l, i).
    """
    layers, n, _ = capacity.shape
    graph = nx.DiGraph()
    for layer in range(1, layers + 1):
        for i in range(n):
            for j in range(n):
                graph.add_edge(
                    (layer - 1, j), (layer, i), capacity=float(capacity[layer - 1, i, j])
                )
    for r in sinks:
        graph.add_edge((layers, r), SINK)  # no capacity attribute: infinite
    return nx.maximum_flow_value(graph, (0, source), SINK)


def _reference_capacities(maps: list[np.ndarray], fusion: str, discard: float) -> np.ndarray:
    """Ã_l = norm_rows(fuse_h(A_l) + I) per image from (B, H, N, N) maps → (B, L, N, N)."""
    batch, _, n, _ = maps[0].shape
    out = np.zeros((batch, len(maps), n, n))
    for b in range(batch):
        for layer, attn in enumerate(maps):
            fused = {"mean": np.mean, "max": np.max, "min": np.min}[fusion](attn[b], axis=0)
            count = int(n * n * discard)
            if count:
                lowest = np.argsort(fused, axis=None)[:count]
                fused = fused.copy()
                fused.flat[lowest] = 0.0
            augmented = fused + np.eye(n)
            for i in range(n):
                out[b, layer, i] = augmented[i] / augmented[i].sum()
    return out


def _flow(rec, **options) -> np.ndarray:
    """attention_flow's maps (class-agnostic: the targets are not read)."""
    spec = get_method("attention_flow")
    params = parse_params(spec.params, options, method="attention_flow")
    targets = torch.zeros(rec.tokens.shape[0], dtype=torch.long)
    return spec.fn(rec, targets, params).heatmap.numpy()


@pytest.fixture(scope="module")
def tiny_case() -> dict:
    """A float64 tiny ViT (L = 3, N = 17), two images, their recording and unfused maps."""
    model = tiny_vit(seed=1, dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _, maps, _ = unfused_attention_and_grads(model, x, torch.tensor([0, 1]))
    return {"rec": record(model, x), "maps": [a.numpy() for a in maps]}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"head_fusion": "max"},
        {"head_fusion": "min", "discard_ratio": 0.5},
        {"head_fusion": "mean", "discard_ratio": 0.9},
        {"head_fusion": "max", "discard_ratio": 0.9},
        {"start_layer": 1},
    ],
)
def test_tiny_vit_matches_networkx(tiny_case, options) -> None:
    got = _flow(tiny_case["rec"], **options)  # (B, 4, 4)
    maps = tiny_case["maps"][options.get("start_layer", 0) :]
    capacity = _reference_capacities(
        maps, options.get("head_fusion", "mean"), options.get("discard_ratio", 0.0)
    )
    batch, _, n, _ = capacity.shape
    for b in range(batch):
        expected = [_nx_flow(capacity[b], source, [0]) for source in range(1, n)]
        np.testing.assert_allclose(got[b].ravel(), expected, rtol=0, atol=1e-6)
    assert got.min() >= 0 and got.max() <= 1 + 1e-12  # the class token's in-capacity is 1
    assert got.std() > 1e-3  # not a constant map


def test_distilled_flows_into_both_readout_tokens() -> None:
    model = tiny_vit(seed=3, dtype=torch.float64, arch="deit_tiny_distilled_patch16_224")
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    got = _flow(record(model, x)).ravel()
    _, maps, _ = unfused_attention_and_grads(model, x, torch.tensor([0]))
    capacity = _reference_capacities([a.numpy() for a in maps], "mean", 0.0)[0]
    prefix = model.num_prefix_tokens
    assert prefix == 2
    expected = [_nx_flow(capacity, s, [0, 1]) for s in range(prefix, capacity.shape[-1])]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    class_token_only = [_nx_flow(capacity, s, [0]) for s in range(prefix, capacity.shape[-1])]
    assert (got >= np.array(class_token_only) - 1e-9).all() and got.max() <= 2 + 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_random_layered_graphs_match_networkx(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers, n = int(rng.integers(1, 6)), int(rng.integers(2, 9))
    capacity = rng.random((2, layers, n, n)) ** rng.integers(1, 4) * rng.choice([0.3, 1.0, 4.0])
    capacity[rng.random(capacity.shape) < (0.0, 0.3, 0.6, 0.9, 0.5, 0.95)[seed]] = 0.0
    sinks = sorted(rng.choice(n, size=int(rng.integers(1, 3)), replace=False).tolist())
    got = max_flow_values(capacity, np.arange(n), np.array(sinks))
    for b in range(2):
        expected = [_nx_flow(capacity[b], s, sinks) for s in range(n)]
        np.testing.assert_allclose(got[b], expected, rtol=0, atol=1e-9)


def test_degenerate_graphs() -> None:
    rng = np.random.default_rng(7)
    capacity = rng.random((1, 3, 5, 5))
    capacity[0, 1] = 0.0  # a layer with no edges: nothing gets through
    assert (max_flow_values(capacity, np.arange(5), np.array([0])) == 0).all()
    capacity = rng.random((1, 3, 5, 5))
    capacity[0, 0, :, 2] = 0.0  # source 2 has no outgoing edge
    capacity[0, 2, 0, 4] = 0.0  # (L-1, 4) cannot reach the sink directly
    got = max_flow_values(capacity, np.arange(5), np.array([0]))[0]
    assert got[2] == 0.0
    np.testing.assert_allclose(got, [_nx_flow(capacity[0], s, [0]) for s in range(5)], atol=1e-9)
    one_layer = rng.random((1, 1, 4, 4))  # (0, s) → (1, r) directly: the edge's capacity
    got = max_flow_values(one_layer, np.arange(4), np.array([1, 3]))[0]
    np.testing.assert_allclose(got, one_layer[0, 0, 1] + one_layer[0, 0, 3], rtol=1e-15)


def test_two_layers_three_tokens_by_hand() -> None:
    """Disjoint paths (0, s) → (1, i) → (2, 0): flow = Σ_i min(Ã_1[i, s], Ã_2[0, i])."""
    a1 = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    a2 = np.array([[0.7, 0.1, 0.2], [0.3, 0.3, 0.4], [0.0, 0.5, 0.5]])
    # s = 0: 0.5 + 0.1 + 0.2; s = 1: 0.3 + 0.1 + 0.2; s = 2: 0.2 + 0.1 + 0.2.
    got = max_flow_values(np.stack([a1, a2])[None], np.arange(3), np.array([0]))
    np.testing.assert_allclose(got, [[0.8, 0.6, 0.5]], rtol=1e-15)


def test_a_flow_that_needs_a_reverse_arc() -> None:
    """s → a → {c, d}, s → b → c only, c → t, d → t, all capacity 1: max flow 2 = both cuts.

    The first shortest path s-a-c-t blocks b; the second unit must cancel a → c through the
    residual arc c → a (s-b-c-a-d-t). Edges into the non-sink (3, 1) and from the other
    layer-0 node must not count.
    """
    cap = np.zeros((3, 2, 2))  # cap[l-1, i, j]: (l-1, j) → (l, i); tokens a, c = 0 and b, d = 1
    cap[0, :, 0] = 1.0  # s = (0, 0) → a, b
    cap[0, :, 1] = (0.25, 0.5)  # the other source (0, 1) → a, b
    cap[1] = [[1.0, 1.0], [1.0, 0.0]]  # a → c, b → c; a → d
    cap[2, 0] = 1.0  # c → t, d → t with t = (3, 0)
    cap[2, 1] = 5.0  # into (3, 1), not a sink
    got = max_flow_values(cap[None], np.arange(2), np.array([0]))
    np.testing.assert_allclose(got, [[2.0, 0.75]], rtol=1e-15)


def test_batched_and_threaded_equal_one_graph_at_a_time() -> None:
    rng = np.random.default_rng(3)
    capacity = rng.random((3, 4, 10, 10)) ** 3
    capacity[rng.random(capacity.shape) < 0.4] = 0.0
    sources, sinks = np.arange(1, 10), np.array([0])
    batched = max_flow_values(capacity, sources, sinks, threads=2)
    for b in range(3):
        single = max_flow_values(capacity[b : b + 1], sources, sinks, threads=1)
        np.testing.assert_array_equal(single[0], batched[b])


def test_explainer_rejects_average_pooling_and_missing_layers() -> None:
    spec = get_method("attention_flow")
    assert not spec.class_specific and not spec.relevance_matrix
    pooled = Explainer(tiny_loaded(seed=3, global_pool="avg", class_token=False))
    with pytest.raises(InvalidArgument, match=r"'attention_flow'.*reads 'avg'"):
        pooled.check(spec, FlowParams(), TargetSpec())
    explainer = Explainer(tiny_loaded())
    with pytest.raises(InvalidArgument, match=r"attention_flow\.start_layer"):
        explainer.check(spec, FlowParams(start_layer=3), TargetSpec())
    x = torch.rand(2, 3, 32, 32)
    result = explainer.explain(ExplainJob(x, spec, FlowParams(), TargetSpec("top_k", k=2)))
    assert result.heatmaps.shape == (2, 2, 4, 4)  # one map serves both explained classes
    np.testing.assert_array_equal(result.heatmaps[:, 0], result.heatmaps[:, 1])
    assert (result.heatmaps >= 0).all() and (result.heatmaps <= 1 + 1e-6).all()


def test_invalid_capacities_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        max_flow_values(-np.ones((1, 2, 3, 3)), np.arange(3), np.array([0]))
    with pytest.raises(ValueError, match="sinks"):
        max_flow_values(np.ones((1, 2, 3, 3)), np.arange(3), np.array([3]))
