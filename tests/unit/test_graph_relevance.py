"""The attention-graph engine (seed 003 Eq. 1-13) against references written from the paper.

Synthetic graphs of the paper's three architecture types (single-stream self-attention over a
joint text+image sequence; LXMERT-like two-stream co-attention; DETR-like encoder-decoder) and
a CLIP-like dual encoder, with random softmax maps and random gradients, B = 2 inputs that differ.
Each reference is its own float64 numpy walk, one input at a time, written from the equations
with the matrices named as in the paper (R_tt, R_ti, ...), not from the engine's code. On timm
ViTs the engine must reproduce `generic` bit for bit (the loop it had before the engine).
"""

from __future__ import annotations

import ast
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny import tiny_loaded, tiny_vit
from vitlens_server.explain import get_method
from vitlens_server.explain.graph import (
    AttentionEdge,
    AttentionGraph,
    LayerMaps,
    Readout,
    TokenSet,
    attribution,
    bi,
    cross,
    propagate,
    raw_attention,
    read_rows,
    rollout,
    self_attention,
    self_attention_graph,
)
from vitlens_server.explain.graph.rules import normalised_self
from vitlens_server.explain.graph.vit import recording_maps, vit_graph
from vitlens_server.explain.methods.lrp import transformer_attribution_relevance
from vitlens_server.explain.params import NoParams
from vitlens_server.explain.recording import record
from vitlens_server.explain.relevance import attention_relevances
from vitlens_server.models import load_model
from vitlens_server.models.default import demo_spec

B, H = 2, 3
TIGHT = {"rtol": 1e-10, "atol": 1e-12}  # float64 engine vs float64 reference


# ---------------------------------------------------------------- random maps and references


def _maps(seed: int, shapes: list[tuple[int, int]], lrp: bool = False) -> list[tuple]:
    """Per layer (A, ∂y/∂A) numpy (B, H, q, k): softmax rows (or signed R^A when ``lrp``)."""
    rng = np.random.default_rng(seed)
    out = []
    for q, k in shapes:
        scores = 2 * rng.normal(size=(B, H, q, k))
        attn = scores if lrp else np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
        out.append((attn, rng.normal(size=(B, H, q, k))))
    return out


def _layer_maps(maps: list[tuple]) -> list[LayerMaps]:
    return [LayerMaps(torch.from_numpy(a), torch.from_numpy(g)) for a, g in maps]


def _bar(attn: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Eq. 5 for one input: mean over heads of the positive part of ∇A ⊙ A, (q, k)."""
    heads = attn.shape[0]
    out = np.zeros(attn.shape[1:])
    for h in range(heads):
        out += np.maximum(grad[h] * attn[h], 0.0) / heads
    return out


def _norm(r: np.ndarray) -> np.ndarray:
    """Eq. 8-9 for one input, row by row; a row of R - I summing to 0 stays 0 (R̄ row = I row)."""
    n = r.shape[0]
    hat = r - np.eye(n)
    out = np.eye(n)
    for m in range(n):
        total = sum(hat[m])
        if total != 0:
            out[m] += hat[m] / total
    return out


def _single_stream_ref(maps, b: int) -> np.ndarray:
    """VisualBERT-like: only Eq. 6 over the joint sequence; R^{(t+i)(t+i)}."""
    n = maps[0][0].shape[-1]
    r = np.eye(n)
    for attn, grad in maps:
        r = r + _bar(attn[b], grad[b]) @ r
    return r


LX_T, LX_I = 5, 6  # text tokens (CLS first), image regions


def _lxmert_shapes() -> list[tuple[int, int]]:
    t, i = LX_T, LX_I
    return (
        [(t, t), (t, t), (i, i), (i, i)] + [(t, i), (i, t), (t, t), (i, i)] * 2 + [(t, i), (t, t)]
    )


def _lxmert_graph(simultaneous: bool = True) -> AttentionGraph:
    """2 text and 2 image self layers; 2 co-attention layers both ways, each followed by a self
    layer per stream; a last co-attention layer of the text stream only (as the authors' code)."""
    t, i = "text", "image"
    both = [(bi(t, i), bi(i, t))] if simultaneous else [bi(t, i), bi(i, t)]
    cross_layer = [*both, self_attention(t), self_attention(i)]
    return AttentionGraph(
        sets=(TokenSet(t, LX_T), TokenSet(i, LX_I)),
        steps=[self_attention(t), self_attention(t), self_attention(i), self_attention(i)]
        + cross_layer * 2
        + [bi(t, i), self_attention(t)],
        readouts=(Readout("answer", t, (t, i), row=0),),
    )


def _lxmert_ref(maps, b: int, simultaneous: bool = True) -> dict[str, np.ndarray]:
    """Eq. 1-2 init, Eq. 6-7 on self layers, Eq. 10-11 on co-attention, both ways at once."""
    bars = [_bar(a[b], g[b]) for a, g in maps]
    r_tt, r_ii = np.eye(LX_T), np.eye(LX_I)
    r_ti, r_it = np.zeros((LX_T, LX_I)), np.zeros((LX_I, LX_T))

    def text_self(a):
        nonlocal r_tt, r_ti
        r_tt, r_ti = r_tt + a @ r_tt, r_ti + a @ r_ti

    def image_self(a):
        nonlocal r_ii, r_it
        r_ii, r_it = r_ii + a @ r_ii, r_it + a @ r_it

    text_self(bars[0]), text_self(bars[1]), image_self(bars[2]), image_self(bars[3])
    for layer in range(2):
        a_ti, a_it, a_tt, a_ii = bars[4 + 4 * layer : 8 + 4 * layer]
        add_ti, add_tt = _norm(r_tt).T @ a_ti @ _norm(r_ii), a_ti @ r_it  # Eq. 10, 11 (text)
        if not simultaneous:
            r_ti, r_tt = r_ti + add_ti, r_tt + add_tt
        add_it, add_ii = _norm(r_ii).T @ a_it @ _norm(r_tt), a_it @ r_ti  # Eq. 10, 11 (image)
        if simultaneous:
            r_ti, r_tt = r_ti + add_ti, r_tt + add_tt
        r_it, r_ii = r_it + add_it, r_ii + add_ii
        text_self(a_tt), image_self(a_ii)
    a_ti, a_tt = bars[12], bars[13]
    r_ti, r_tt = r_ti + _norm(r_tt).T @ a_ti @ _norm(r_ii), r_tt + a_ti @ r_it
    text_self(a_tt)
    return {"tt": r_tt, "ti": r_ti, "ii": r_ii, "it": r_it}


DE_E, DE_Q = 8, 4  # encoder tokens (image regions), decoder queries


def _detr_graph() -> AttentionGraph:
    e, q = "encoder", "queries"
    return AttentionGraph(
        sets=(TokenSet(e), TokenSet(q)),
        steps=[self_attention(e), self_attention(e)] + [self_attention(q), cross(q, e)] * 2,
        readouts=(Readout("detection", q, (e,), row=None),),
    )


def _detr_shapes() -> list[tuple[int, int]]:
    return [(DE_E, DE_E)] * 2 + [(DE_Q, DE_Q), (DE_Q, DE_E)] * 2


def _detr_ref(maps, b: int) -> dict[str, np.ndarray]:
    """R^{ee} by Eq. 6; decoder self-attention by Eq. 6-7; cross-attention by Eq. 10 only."""
    bars = [_bar(a[b], g[b]) for a, g in maps]
    r_ee, r_dd, r_de = np.eye(DE_E), np.eye(DE_Q), np.zeros((DE_Q, DE_E))
    for a in bars[:2]:
        r_ee = r_ee + a @ r_ee
    for a_dd, a_de in zip(bars[2::2], bars[3::2], strict=True):
        r_dd, r_de = r_dd + a_dd @ r_dd, r_de + a_dd @ r_de
        r_de = r_de + _norm(r_dd).T @ a_de @ _norm(r_ee)
    return {"ee": r_ee, "dd": r_dd, "de": r_de}


# ---------------------------------------------------------------- the three architectures


def test_single_stream_reads_the_cls_row_of_the_joint_sequence() -> None:
    text, image = 5, 7
    graph = AttentionGraph(
        sets=(TokenSet("joint", text + image),),
        steps=[self_attention("joint", f"layer.{n}") for n in range(3)],
        readouts=(Readout("answer", "joint", ("joint",), row=0),),
    )
    maps = _maps(0, [(text + image, text + image)] * 3)
    result = propagate(graph, _layer_maps(maps), dtype=torch.float64)
    row = result.read("answer")["joint"]
    assert row.shape == (B, text + image) and row.dtype == torch.float64
    text_part, image_part = row.split([text, image], dim=-1)
    for b in range(B):
        ref = _single_stream_ref(maps, b)
        np.testing.assert_allclose(result.matrix("joint", "joint")[b].numpy(), ref, **TIGHT)
        np.testing.assert_allclose(text_part[b].numpy(), ref[0, :text], **TIGHT)
        np.testing.assert_allclose(image_part[b].numpy(), ref[0, text:], **TIGHT)
    assert not torch.allclose(row[0], row[1])  # the inputs differ


PAIRS = {
    "tt": ("text", "text"),
    "ti": ("text", "image"),
    "ii": ("image", "image"),
    "it": ("image", "text"),
}


@pytest.mark.parametrize("simultaneous", [True, False], ids=["both-ways-at-once", "in-turn"])
def test_two_stream_co_attention_matches_eq_6_to_11(simultaneous: bool) -> None:
    maps = _maps(1, _lxmert_shapes())
    result = propagate(_lxmert_graph(simultaneous), _layer_maps(maps), dtype=torch.float64)
    answer = result.read("answer")
    for b in range(B):
        ref = _lxmert_ref(maps, b, simultaneous)
        for pair, (q, k) in PAIRS.items():
            np.testing.assert_allclose(result.matrix(q, k)[b].numpy(), ref[pair], **TIGHT)
        np.testing.assert_allclose(answer["text"][b].numpy(), ref["tt"][0], **TIGHT)  # §3.1
        np.testing.assert_allclose(answer["image"][b].numpy(), ref["ti"][0], **TIGHT)


def test_co_attention_both_ways_reads_the_state_before_the_step() -> None:
    """Declaring the two directions as one step differs from declaring them in turn: Eq. 11 of
    image <- text then sees the R^{ti} the text <- image layer of the same step made."""
    maps = _maps(1, _lxmert_shapes())
    at_once = propagate(_lxmert_graph(True), _layer_maps(maps), dtype=torch.float64)
    in_turn = propagate(_lxmert_graph(False), _layer_maps(maps), dtype=torch.float64)
    assert not torch.allclose(at_once.matrix("image", "image"), in_turn.matrix("image", "image"))


def test_encoder_decoder_reads_row_j_of_r_de() -> None:
    maps = _maps(2, _detr_shapes())
    result = propagate(_detr_graph(), _layer_maps(maps), dtype=torch.float64)
    assert ("encoder", "queries") not in result.matrices  # no R^{ed} (§3.2)
    detections = torch.tensor([3, 1])  # the explained detection of each input
    row = result.read("detection", rows=detections)["encoder"]
    several = result.read("detection", rows=torch.tensor([[0, 2], [1, 3]]))["encoder"]
    assert row.shape == (B, DE_E) and several.shape == (B, 2, DE_E)
    for b in range(B):
        ref = _detr_ref(maps, b)
        np.testing.assert_allclose(
            result.matrix("queries", "encoder")[b].numpy(), ref["de"], **TIGHT
        )
        np.testing.assert_allclose(
            result.matrix("encoder", "encoder")[b].numpy(), ref["ee"], **TIGHT
        )
        np.testing.assert_allclose(
            result.matrix("queries", "queries")[b].numpy(), ref["dd"], **TIGHT
        )
        np.testing.assert_allclose(row[b].numpy(), ref["de"][detections[b]], **TIGHT)
        np.testing.assert_allclose(several[b].numpy(), ref["de"][[[0, 2], [1, 3]][b]], **TIGHT)


def test_cross_attention_has_no_eq_11_where_bi_attention_has() -> None:
    """The same maps on queries <- keys as cross vs bi, after a bi layer keys <- queries made
    R^{kq}: only bi adds Ā·R^{kq} to R^{qq}."""
    sets = (TokenSet("q", 3), TokenSet("k", 4))
    maps = _maps(3, [(4, 3), (3, 4)])
    found = {}
    for kind in ("bi", "cross"):
        graph = AttentionGraph(sets, [bi("k", "q"), AttentionEdge(kind, "q", "k")])
        found[kind] = propagate(graph, _layer_maps(maps), dtype=torch.float64)
    for b in range(B):
        a_kq, a_qk = _bar(*[m[b] for m in maps[0]]), _bar(*[m[b] for m in maps[1]])
        r_kq = a_kq  # first layer: R̄^{kk} = R̄^{qq} = I, so Eq. 10 adds Ā itself
        np.testing.assert_allclose(found["bi"].matrix("q", "q")[b].numpy(), np.eye(3) + a_qk @ r_kq)
        np.testing.assert_allclose(found["cross"].matrix("q", "q")[b].numpy(), np.eye(3))
        for kind in ("bi", "cross"):
            np.testing.assert_allclose(found[kind].matrix("q", "k")[b].numpy(), a_qk, **TIGHT)


def test_dual_encoder_reads_each_towers_pooled_row() -> None:
    """CLIP-like: no attention between the towers; the image map is the CLS row of R^{ii}
    without the CLS column, the text relevance the EOT row of R^{tt} (EOT differs per input)."""
    graph = AttentionGraph(
        sets=(TokenSet("image", prefix=1), TokenSet("text")),
        steps=[self_attention("image")] * 2 + [self_attention("text")] * 3,
        readouts=(
            Readout("image", "image", ("image",), row=0),
            Readout("text", "text", ("text",), row=None),
        ),
    )
    for image_tokens, text_tokens, seed in ((5, 6, 4), (5, 9, 5)):  # text length per batch
        maps = _maps(seed, [(image_tokens,) * 2] * 2 + [(text_tokens,) * 2] * 3)
        result = propagate(graph, _layer_maps(maps), dtype=torch.float64)
        eot = torch.tensor([text_tokens - 1, text_tokens - 3])
        image_map = result.read("image")["image"]
        text_map = result.read("text", rows=eot)["text"]
        assert image_map.shape == (B, image_tokens - 1) and text_map.shape == (B, text_tokens)
        for b in range(B):
            np.testing.assert_allclose(
                image_map[b].numpy(), _single_stream_ref(maps[:2], b)[0, 1:], **TIGHT
            )
            np.testing.assert_allclose(
                text_map[b].numpy(), _single_stream_ref(maps[2:], b)[eot[b]], **TIGHT
            )
        assert ("image", "text") not in result.matrices
        towers = {  # the same, one graph per tower (the towers' batches may then differ)
            "image": propagate(
                self_attention_graph("image", 2, prefix=1), _layer_maps(maps[:2]), dtype=None
            ).read("image")["image"],
            "text": propagate(
                self_attention_graph("text", 3, row=None), _layer_maps(maps[2:]), dtype=None
            ).read("text", rows=eot)["text"],
        }
        assert torch.equal(towers["image"], image_map) and torch.equal(towers["text"], text_map)


# ---------------------------------------------------------------- zero rows, LRP, dtype


def test_normalisation_of_hand_computed_rows() -> None:
    """R = [[1, 0, 0], [.5, 1.5, 0], [0, 2, 3]]: R - I = [[0, 0, 0], [.5, .5, 0], [0, 2, 2]];
    row 0 sums to 0 and stays 0, the others are divided by 1 and 4."""
    r = torch.tensor([[[1.0, 0, 0], [0.5, 1.5, 0], [0, 2, 3]]], dtype=torch.float64)
    expected = torch.tensor([[[1.0, 0, 0], [0.5, 1.5, 0], [0, 0.5, 1.5]]], dtype=torch.float64)
    torch.testing.assert_close(normalised_self(r), expected)
    torch.testing.assert_close(normalised_self(torch.eye(4)[None]), torch.eye(4)[None])


def test_co_attention_first_layer_sees_identity_self_relevance() -> None:
    """No self-attention before the first co-attention: R̂ = 0 on every row, R̄ = I, so
    Eq. 10 adds Ā itself and no NaN appears (the unguarded 0/0 would make it all NaN)."""
    graph = AttentionGraph((TokenSet("t", 4), TokenSet("i", 5)), [(bi("t", "i"), bi("i", "t"))])
    maps = _maps(6, [(4, 5), (5, 4)])
    result = propagate(graph, _layer_maps(maps), dtype=torch.float64)
    for b in range(B):
        np.testing.assert_allclose(
            result.matrix("t", "i")[b].numpy(), _bar(*[m[b] for m in maps[0]])
        )
        np.testing.assert_allclose(
            result.matrix("i", "t")[b].numpy(), _bar(*[m[b] for m in maps[1]])
        )
    torch.testing.assert_close(
        result.matrix("t", "t"), torch.eye(4, dtype=torch.float64).expand(B, 4, 4)
    )


def test_zero_rows_of_some_inputs_keep_their_identity_row() -> None:
    """Input 0 has zero gradients on decoder query rows 1 and 3 of its self-attention, so those
    rows of R̂^{dd} are 0: R̄ keeps the identity there (the reference's rule), elsewhere it is the
    plain Eq. 9, and input 1 (no zero row) equals Eq. 9 without any guard."""
    maps = _maps(7, _detr_shapes())
    for layer in (2, 4):  # the decoder self-attention layers
        maps[layer][1][0, :, [1, 3]] = 0.0
    result = propagate(_detr_graph(), _layer_maps(maps), dtype=torch.float64)
    assert torch.isfinite(result.matrix("queries", "encoder")).all()
    hat = result.matrix("queries", "queries")[0].numpy() - np.eye(DE_Q)
    assert np.all(hat[[1, 3]] == 0) and np.all(hat[[0, 2]].sum(-1) > 0)
    for b in range(B):
        np.testing.assert_allclose(
            result.matrix("queries", "encoder")[b].numpy(), _detr_ref(maps, b)["de"], **TIGHT
        )
    r_dd = result.matrix("queries", "queries")[1].numpy()
    hat = r_dd - np.eye(DE_Q)
    unguarded = hat / hat.sum(-1, keepdims=True) + np.eye(DE_Q)
    np.testing.assert_allclose(normalised_self(result.matrix("queries", "queries"))[1], unguarded)


def test_lrp_variant_uses_r_a_in_place_of_a() -> None:
    """Eq. 13: Ā = E_h((∇A ⊙ R^A)⁺) with signed R^A, through every rule (LXMERT-like graph)."""
    maps = _maps(8, _lxmert_shapes(), lrp=True)
    assert min(a.min() for a, _ in maps) < 0
    result = propagate(_lxmert_graph(), _layer_maps(maps), dtype=torch.float64)
    for b in range(B):
        ref = _lxmert_ref(maps, b)
        np.testing.assert_allclose(result.matrix("text", "image")[b].numpy(), ref["ti"], **TIGHT)
        np.testing.assert_allclose(result.matrix("text", "text")[b].numpy(), ref["tt"], **TIGHT)


def test_dtype_float32_by_default_float64_on_request_and_inputs_unchanged() -> None:
    maps = _maps(9, _detr_shapes())
    layer_maps = _layer_maps(maps)
    copies = [(m.attention.clone(), m.gradient.clone()) for m in layer_maps]
    single = propagate(_detr_graph(), layer_maps).matrix("queries", "encoder")
    double = propagate(_detr_graph(), layer_maps, dtype=torch.float64).matrix("queries", "encoder")
    own = propagate(_detr_graph(), iter(layer_maps), dtype=None).matrix("queries", "encoder")
    assert single.dtype == torch.float32 and double.dtype == own.dtype == torch.float64
    torch.testing.assert_close(single.double(), double, rtol=1e-5, atol=1e-6)
    for m, (a, g) in zip(layer_maps, copies, strict=True):
        assert torch.equal(m.attention, a) and torch.equal(m.gradient, g)


def test_maps_are_consumed_one_layer_at_a_time() -> None:
    """A generator's maps are released before the next layer's are asked for (memory: one
    layer's A and ∂y/∂A at a time, as `generic` had)."""
    alive: list[weakref.ref] = []

    def lazy():
        for attn, grad in _maps(14, _lxmert_shapes()):
            assert all(ref() is None for ref in alive)
            found = LayerMaps(torch.from_numpy(attn), torch.from_numpy(grad))
            alive[:] = [weakref.ref(found.attention), weakref.ref(found.gradient)]
            yield found
            del found

    propagate(_lxmert_graph(), lazy())
    assert len(alive) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_the_maps_device() -> None:
    maps = [LayerMaps(a.cuda(), g.cuda()) for a, g in _layer_maps(_maps(10, _lxmert_shapes()))]
    result = propagate(_lxmert_graph(), maps, dtype=torch.float64)
    assert result.matrix("text", "image").device.type == "cuda"
    cpu = propagate(_lxmert_graph(), _layer_maps(_maps(10, _lxmert_shapes())), dtype=torch.float64)
    torch.testing.assert_close(result.matrix("text", "image").cpu(), cpu.matrix("text", "image"))


# ---------------------------------------------------------------- §4 baselines


def _rollout_ref(maps) -> np.ndarray:
    """Abnar & Zuidema for one input: Ã = norm_rows(mean_h A + I), product in layer order."""
    n = maps[0].shape[-1]
    r = np.eye(n)
    for attn in maps:
        fused = attn.mean(0) + np.eye(n)
        r = (fused / fused.sum(-1, keepdims=True)) @ r
    return r


def test_rollout_and_eq_12_on_the_encoder_decoder() -> None:
    maps = _maps(11, _detr_shapes())
    result = rollout(_detr_graph(), _layer_maps(maps), dtype=torch.float64)
    for b in range(B):
        r_ee = _rollout_ref([maps[0][0][b], maps[1][0][b]])
        r_dd = _rollout_ref([maps[2][0][b], maps[4][0][b]])
        last = maps[5][0][b].mean(0)  # the last cross-attention map, head mean
        np.testing.assert_allclose(result.matrix("encoder", "encoder")[b].numpy(), r_ee, **TIGHT)
        np.testing.assert_allclose(
            result.matrix("queries", "encoder")[b].numpy(), r_dd.T @ last @ r_ee, **TIGHT
        )


def test_raw_attention_and_attribution_baselines() -> None:
    maps = _maps(12, _lxmert_shapes(), lrp=True)
    raw = raw_attention(_lxmert_graph(), _layer_maps(maps), dtype=torch.float64)
    ta = attribution(_lxmert_graph(), _layer_maps(maps), dtype=torch.float64)
    text_selves = [0, 1, 6, 10, 13]  # text self-attention layers, in order
    for b in range(B):
        np.testing.assert_allclose(raw.matrix("text", "text")[b].numpy(), maps[13][0][b].mean(0))
        np.testing.assert_allclose(raw.matrix("text", "image")[b].numpy(), maps[12][0][b].mean(0))
        r_tt = np.eye(LX_T)
        for layer in text_selves:
            r_tt = r_tt + _bar(maps[layer][0][b], maps[layer][1][b]) @ r_tt
        np.testing.assert_allclose(ta.matrix("text", "text")[b].numpy(), r_tt, **TIGHT)
        last = _bar(maps[12][0][b], maps[12][1][b])
        np.testing.assert_allclose(ta.matrix("text", "image")[b].numpy(), last, **TIGHT)


# ---------------------------------------------------------------- the timm ViT: `generic`


def _generic_before_the_engine(rec) -> torch.Tensor:
    """`generic`'s own loop before it went through the engine (git history), (B, N, N)."""
    relevance = None
    for layer in range(rec.num_layers):
        weighted = (rec.attention_grad(layer) * rec.attention(layer)).clamp(min=0).mean(dim=1)
        if relevance is None:
            eye = torch.eye(weighted.shape[-1], dtype=weighted.dtype, device=weighted.device)
            relevance = eye.expand_as(weighted).clone()
        relevance = relevance + weighted @ relevance
    return relevance


def _check_vit(module: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> None:
    rec = record(module, x, targets)
    before = _generic_before_the_engine(rec)
    graph = vit_graph(rec.num_layers, rec.num_prefix_tokens)
    engine = propagate(graph, recording_maps(rec), dtype=None)
    assert torch.equal(engine.matrix("tokens", "tokens"), before)  # bit for bit
    out = get_method("generic").fn(rec, targets, NoParams())
    assert torch.equal(out.relevance, before) and torch.equal(out.heatmap, rec.readout_map(before))
    row = engine.read("logits", rows=rec.readout)["tokens"]  # the readout row, prefix dropped
    torch.testing.assert_close(row.reshape(out.heatmap.shape), out.heatmap, rtol=1e-6, atol=1e-7)
    default = propagate(graph, recording_maps(rec)).matrix("tokens", "tokens")  # float32
    torch.testing.assert_close(default, before.float(), rtol=1e-6, atol=1e-7)


def test_the_demo_model_graph_reproduces_generic() -> None:
    model = load_model(demo_spec())
    x = torch.randn(2, 3, 224, 224)
    _check_vit(model.module, x, torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"reg_tokens": 2}, {"arch": "deit_tiny_distilled_patch16_224"}, {"global_pool": "avg"}],
    ids=["class-token", "registers", "distilled", "avg-pool"],
)
def test_tiny_vit_graphs_reproduce_generic(overrides: dict) -> None:
    model = tiny_loaded(seed=4, **overrides).module
    _check_vit(model, torch.randn(3, 3, 32, 32), torch.tensor([1, 4, 0]))


def test_vit_graph_baselines_match_rollout_and_transformer_attribution() -> None:
    """Rollout over the ViT graph is METHODS['rollout']; attribution with R^A from the LRP walk
    is Transformer Attribution (Eq. 13 + Eq. 6)."""
    model = tiny_vit(seed=5, dtype=torch.float64)
    x, targets = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([3, 1])
    rec = record(model, x, targets, lrp=True)
    graph = vit_graph(rec.num_layers, rec.num_prefix_tokens)
    spec = get_method("rollout")
    expected = spec.fn(rec, targets, spec.params()).relevance
    torch.testing.assert_close(
        rollout(graph, recording_maps(rec), dtype=None).matrix("tokens", "tokens"), expected
    )
    lrp_maps = [
        LayerMaps(rel, rec.attention_grad(layer))
        for layer, rel in enumerate(attention_relevances(rec, targets))
    ]
    ta = transformer_attribution_relevance(rec, targets)
    torch.testing.assert_close(
        propagate(graph, lrp_maps, dtype=None).matrix("tokens", "tokens"), ta
    )


# ---------------------------------------------------------------- declarations and reading


def test_declarations_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match="queries == keys"):
        AttentionEdge("self", "a", "b")
    with pytest.raises(ValueError, match="queries == keys"):
        bi("a", "a")
    with pytest.raises(ValueError, match="unknown attention kind"):
        AttentionEdge("co", "a", "b")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="undeclared token set"):
        AttentionGraph((TokenSet("a"),), [cross("a", "b")])
    with pytest.raises(ValueError, match="never creates"):
        AttentionGraph(
            (TokenSet("e"), TokenSet("d")), [cross("d", "e")], [Readout("x", "e", ("d",))]
        )
    with pytest.raises(ValueError, match="unique"):
        AttentionGraph((TokenSet("a"), TokenSet("a")), [])
    graph = AttentionGraph((TokenSet("e"), TokenSet("d")), [cross("d", "e")])
    assert graph.pairs == {("e", "e"), ("d", "d"), ("d", "e")}
    assert graph.steps == ((cross("d", "e"),),) and graph.edges == (cross("d", "e"),)


def test_maps_that_do_not_fit_the_graph_are_refused() -> None:
    maps = _layer_maps(_maps(13, _detr_shapes()))
    with pytest.raises(ValueError, match="ran out"):
        propagate(_detr_graph(), maps[:-1])
    with pytest.raises(ValueError, match="more maps"):
        propagate(_detr_graph(), [*maps, maps[0]])
    with pytest.raises(ValueError, match="needs"):
        propagate(_detr_graph(), [LayerMaps(maps[0].attention), *maps[1:]])
    with pytest.raises(ValueError, match="has 8 tokens"):  # encoder size changes mid-graph
        propagate(_detr_graph(), [*maps[:5], _layer_maps(_maps(0, [(DE_Q, 7)]))[0]])
    with pytest.raises(ValueError, match="has 5 tokens"):  # declared size
        propagate(_lxmert_graph(), _layer_maps(_maps(0, [(4, 4), *_lxmert_shapes()[1:]])))
    result = propagate(_detr_graph(), maps)
    with pytest.raises(ValueError, match="pass rows"):
        result.read("detection")
    with pytest.raises(KeyError, match="no readout"):
        result.read("answer")


def test_read_rows_by_index_and_by_weights() -> None:
    matrix = torch.arange(2 * 3 * 2, dtype=torch.float64).view(2, 3, 2)  # (B, q, k)
    torch.testing.assert_close(read_rows(matrix, 1), matrix[:, 1])
    torch.testing.assert_close(
        read_rows(matrix, torch.tensor([2, 0])), torch.stack([matrix[0, 2], matrix[1, 0]])
    )
    weights = torch.tensor([0.5, 0.5, 0.0])
    torch.testing.assert_close(read_rows(matrix, weights), (matrix[:, 0] + matrix[:, 1]) / 2)
    per_input = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    torch.testing.assert_close(
        read_rows(matrix, per_input), torch.stack([matrix[0, 0], matrix[1, 2]])
    )


def test_declarations_import_no_torch() -> None:
    """declare.py is plain data: a model's graph can be built without tensors."""
    source = Path(__import__("vitlens_server.explain.graph.declare", fromlist=["_"]).__file__)
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not any(name.split(".")[0] == "torch" for name in imported), imported
