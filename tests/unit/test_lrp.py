"""LRP (Chefer, Gur & Wolf, CVPR 2021) on stock timm ViTs against loops written from the rules.

The references below recompute every activation with their own walk through the timm modules
(unfused attention) and propagate relevance with scalar loops over tokens and features in numpy
float64, writing each rule in its textbook form (e.g. the α1β0 rule as positive contributions
(x_j w_ij)⁺), so both the capture and the batched tensor code are checked.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from timm.layers import GluMlp

from tests.tiny import TINY_KWARGS, tiny_loaded, tiny_vit, unfused_attention_and_grads
from vitlens_server.errors import InvalidArgument
from vitlens_server.explain import Explainer, ExplainJob, TargetSpec, get_method, relevance
from vitlens_server.explain.capture import AttentionHooks
from vitlens_server.explain.methods.lrp import transformer_attribution_relevance
from vitlens_server.explain.params import NoParams
from vitlens_server.explain.recording import record
from vitlens_server.explain.records import Recording

EPS = relevance.EPS
VARIANTS = {
    "plain": {},
    "layerscale": {"init_values": 1e-5},
    "avg-pool": {"global_pool": "avg", "class_token": False},
    "registers": {"reg_tokens": 2},
    "distilled": {"distilled": True},
}


def _model(variant: str, seed: int = 1) -> torch.nn.Module:
    """A float64 tiny ViT with random biases and norm affines (timm initialises them 0 and 1)."""
    kwargs = dict(VARIANTS[variant])
    if kwargs.pop("distilled", False):
        torch.manual_seed(seed)
        model = timm.create_model("deit_tiny_distilled_patch16_224", **TINY_KWARGS)
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight.mul_(4.0)
        model = model.eval().to(torch.float64)
    else:
        model = tiny_vit(seed, dtype=torch.float64, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
            elif "norm" in name and name.endswith("weight"):
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return model


# ------------------------------------------------------------------ reference (numpy loops)


def _forward_activations(model, x: torch.Tensor) -> dict:
    """Every activation the rules read, by an explicit walk through the timm submodules."""
    p = model.num_prefix_tokens
    acts: dict = {"blocks": []}
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for block in model.blocks:
            attn = block.attn
            b, n, _ = h.shape
            qkv_in = block.norm1(h)
            qkv = attn.qkv(qkv_in).view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
            a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
            proj_in = attn.norm((a @ v).transpose(1, 2).reshape(b, n, -1))
            branch1 = block.ls1(attn.proj(proj_in))
            mid = h + branch1
            fc1_in = block.norm2(mid)
            fc2_in = block.mlp.norm(block.mlp.act(block.mlp.fc1(fc1_in)))
            branch2 = block.ls2(block.mlp.fc2(fc2_in))
            acts["blocks"].append(
                {"x": h, "qkv_in": qkv_in, "q": q, "k": k, "v": v, "A": a, "proj_in": proj_in}
                | {"b1": branch1, "fc1_in": fc1_in, "fc2_in": fc2_in, "b2": branch2}
            )
            h = mid + branch2
        tokens = model.norm(h)
        if getattr(model, "head_dist", None) is not None:
            outs = [model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])]
            acts |= {"pool": "distilled", "head_in": [tokens[:, 0], tokens[:, 1]], "outs": outs}
            logits = (outs[0] + outs[1]) / 2
        elif model.global_pool == "avg":
            pooled = tokens[:, p:].mean(1)
            head_in = model.fc_norm(pooled)
            acts |= {"pool": "avg", "pooled": pooled, "head_in": [head_in]}
            logits = model.head(head_in)
        else:
            acts |= {"pool": "token", "head_in": [model.fc_norm(tokens[:, 0])]}
            logits = model.head(acts["head_in"][0])
        acts |= {"tokens": tokens, "P": p}
    torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)
    return _to_numpy(acts)


def _to_numpy(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().numpy()
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_numpy(v) for v in tree]
    return tree


def _div(num: float, den: float) -> float:
    return 0.0 if den == 0 else num / (den + EPS * np.sign(den))


def _ref_linear(x: np.ndarray, w: np.ndarray, r: np.ndarray) -> np.ndarray:
    """α=1, β=0 for one image: R_j = Σ_i (x_j w_ij)⁺ / Σ_j' (x_j' w_ij')⁺ · R_i; x (T, I)."""
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for i in range(w.shape[0]):
            z = [max(x[t, j] * w[i, j], 0.0) for j in range(x.shape[1])]
            share = _div(r[t, i], sum(z))
            for j in range(x.shape[1]):
                out[t, j] += z[j] * share
    return out


def _ref_add(x: np.ndarray, f: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Skip connection: z-rule, then totals |Σ R_x| : |Σ R_f| summing to Σ R."""
    rx, rf = np.zeros_like(x), np.zeros_like(f)
    for idx in np.ndindex(x.shape):
        rx[idx] = x[idx] * _div(r[idx], x[idx] + f[idx])
        rf[idx] = f[idx] * _div(r[idx], x[idx] + f[idx])
    sx, sf, total = rx.sum(), rf.sum(), r.sum()
    rx *= _div(_div(abs(sx), abs(sx) + abs(sf)) * total, sx)
    rf *= _div(_div(abs(sf), abs(sx) + abs(sf)) * total, sf)
    return rx, rf


def _ref_product(a: np.ndarray, b: np.ndarray, r: np.ndarray, scale: float = 1.0):
    """z-rule for z_ij = scale Σ_k a_ik b_kj, each term's share split between a and b, halved."""
    ra, rb = np.zeros_like(a), np.zeros_like(b)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            terms = [scale * a[i, k] * b[k, j] for k in range(a.shape[1])]
            share = _div(r[i, j], sum(terms))
            for k, term in enumerate(terms):
                ra[i, k] += term * share / 2
                rb[k, j] += term * share / 2
    return ra, rb


def _ref_attention_relevances(model, acts: dict, b: int, target: int) -> list[np.ndarray]:
    """R^{A_l} (H, N, N) of image b for every block, from e_target at the logits."""
    heads = [model.head] + ([model.head_dist] if acts["pool"] == "distilled" else [])
    start = np.array([[1.0 if c == target else 0.0 for c in range(model.num_classes)]])
    if acts["pool"] == "distilled":
        halves = [acts["outs"][h][b : b + 1] / 2 for h in range(2)]
        per_head = _ref_add(halves[0], halves[1], start)
    else:
        per_head = (start,)
    pooled = [
        _ref_linear(acts["head_in"][h][b : b + 1], head.weight.detach().numpy(), per_head[h])[0]
        for h, head in enumerate(heads)
    ]
    tokens = acts["tokens"][b]
    r = np.zeros_like(tokens)
    if acts["pool"] == "avg":
        p, count = acts["P"], tokens.shape[0] - acts["P"]
        for t in range(p, tokens.shape[0]):
            for d in range(tokens.shape[1]):
                r[t, d] = tokens[t, d] / count * _div(pooled[0][d], acts["pooled"][b, d])
    else:
        for token, rel in enumerate(pooled):
            r[token] = rel
    found = []
    for layer in reversed(range(len(model.blocks))):
        block, a = model.blocks[layer], acts["blocks"][layer]
        w = {name: m.weight.detach().numpy() for name, m in _linears(block).items()}
        mid = a["x"][b] + a["b1"][b]
        r_mid, r_b2 = _ref_add(mid, a["b2"][b], r)
        r_mid = r_mid + _ref_linear(
            a["fc1_in"][b], w["fc1"], _ref_linear(a["fc2_in"][b], w["fc2"], r_b2)
        )
        r_x, r_b1 = _ref_add(a["x"][b], a["b1"][b], r_mid)
        r_o = _ref_linear(a["proj_in"][b], w["proj"], r_b1)  # (N, H·D_h)
        heads_n, n, dh = a["v"][b].shape
        r_attn, r_qkv = np.zeros((heads_n, n, n)), np.zeros((n, 3, heads_n, dh))
        for h in range(heads_n):
            r_attn[h], r_v = _ref_product(a["A"][b, h], a["v"][b, h], r_o[:, h * dh : (h + 1) * dh])
            r_q, r_kt = _ref_product(a["q"][b, h], a["k"][b, h].T, r_attn[h], block.attn.scale)
            r_qkv[:, 0, h], r_qkv[:, 1, h], r_qkv[:, 2, h] = r_q, r_kt.T, r_v
        r = r_x + _ref_linear(a["qkv_in"][b], w["qkv"], r_qkv.reshape(n, -1))
        found.append(r_attn)
    return found[::-1]


def _linears(block) -> dict:
    return {
        "qkv": block.attn.qkv,
        "proj": block.attn.proj,
        "fc1": block.mlp.fc1,
        "fc2": block.mlp.fc2,
    }


def _readout_row(matrix: np.ndarray, pool: str, p: int) -> np.ndarray:
    """Row 0; the mean of rows 0, 1 (DeiT distilled); the mean of the patch rows (avg); over P:."""
    rows = {"token": [0], "distilled": [0, 1], "avg": list(range(p, matrix.shape[0]))}[pool]
    return np.array([np.mean([matrix[i, j] for i in rows]) for j in range(p, matrix.shape[1])])


def _ref_maps(r_attn: list[np.ndarray], grads: list[np.ndarray], pool: str, p: int):
    """partial LRP (map, mean_h (R^{A_L})⁺) and Transformer Attribution (map, R), by loops."""
    heads, n, _ = r_attn[-1].shape
    fused = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            fused[i, j] = sum(max(r_attn[-1][h, i, j], 0.0) for h in range(heads)) / heads
    rel = np.eye(n)
    for layer in range(len(r_attn)):
        bar = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                bar[i, j] = (
                    sum(
                        max(grads[layer][h, i, j] * r_attn[layer][h, i, j], 0.0)
                        for h in range(heads)
                    )
                    / heads
                )
        rel = rel + np.array(
            [[sum(bar[i, k] * rel[k, j] for k in range(n)) for j in range(n)] for i in range(n)]
        )
    return _readout_row(fused, pool, p), fused, _readout_row(rel, pool, p), rel


# --------------------------------------------------------------------- against the reference


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request) -> dict:
    """A variant's model, 2 images, their recording and the loop references."""
    model = _model(request.param)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    targets = torch.tensor([3, 1])
    acts = _forward_activations(model, x)
    _, _, grads = unfused_attention_and_grads(model, x, targets)
    ref = [_ref_attention_relevances(model, acts, b, int(targets[b])) for b in range(2)]
    maps = [
        _ref_maps(ref[b], [g[b].numpy() for g in grads], acts["pool"], acts["P"]) for b in range(2)
    ]
    rec = record(model, x, targets, lrp=True)
    return {"model": model, "targets": targets, "rec": rec, "ref": ref, "maps": maps}


def _assert_close(got: torch.Tensor, want: np.ndarray) -> None:
    """Tight agreement relative to the reference's scale (float64 sums differ only in order)."""
    scale = np.abs(want).max()
    assert scale > 0
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-10 * scale)


def test_attention_relevance_of_every_block_matches_the_loop_reference(case) -> None:
    found = relevance.attention_relevances(case["rec"], case["targets"])
    assert len(found) == len(case["model"].blocks)
    for layer, rel in enumerate(found):
        for b in range(2):
            _assert_close(rel[b], case["ref"][b][layer])


def test_partial_lrp_and_transformer_attribution_match_the_loop_reference(case) -> None:
    rec: Recording = case["rec"]
    targets = case["targets"]
    with torch.no_grad():  # as the engine calls methods
        partial = get_method("partial_lrp").fn(rec, targets, NoParams())
        attribution = get_method("transformer_attribution").fn(rec, targets, NoParams())
    for b in range(2):
        want_partial, want_fused, want_map, want_rel = case["maps"][b]
        _assert_close(partial.heatmap[b], want_partial.reshape(rec.grid))
        _assert_close(partial.relevance[b], want_fused)
        _assert_close(attribution.heatmap[b], want_map.reshape(rec.grid))
        _assert_close(attribution.relevance[b], want_rel)
    torch.testing.assert_close(
        transformer_attribution_relevance(rec, targets), attribution.relevance
    )


# ------------------------------------------------------------- elementary rules, by hand


def test_safe_divide_adds_a_signed_epsilon_and_zeroes_division_by_zero() -> None:
    num, den = (
        torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
        torch.tensor([2.0, -4.0, 0.0], dtype=torch.float64),
    )
    assert relevance.safe_divide(num, den).tolist() == [1 / (2 + 1e-9), 1 / (-4 - 1e-9), 0.0]
    assert relevance.safe_divide(num, den, eps=0.0).tolist() == [0.5, -0.25, 0.0]


def test_linear_alpha1_beta0_by_hand() -> None:
    # Contributions x_j w_ij: output 0: (3, -2, 1) → positive (3, 0, 1), z = 4;
    # output 1: (-1, 4, 2) → (0, 4, 2), z = 6. R_in = (3/4, 0, 1/4)·1 + (0, 4/6, 2/6)·2.
    # Output 2: (-1, -2, -1) has no positive contribution, z = 0: its relevance 5 is dropped.
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    w = torch.tensor([[3.0, 1.0, 2.0], [-1.0, -2.0, 4.0], [-1.0, 1.0, -2.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 2.0, 5.0]], dtype=torch.float64)
    out = relevance.linear_relevance(x, w, r)
    torch.testing.assert_close(out, torch.tensor([[0.75, 4 / 3, 11 / 12]], dtype=torch.float64))
    assert out.sum().item() == pytest.approx(3.0, rel=1e-9)  # conserved up to ε = 1e-9


def test_product_z_rule_halves_by_hand() -> None:
    # z = a @ b = (1·3 + 2·4, 1·1 + 2·(−1)) = (11, −1); term shares R/z = (2, −1).
    a = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[3.0, 1.0], [4.0, -1.0]], dtype=torch.float64)
    r = torch.tensor([[22.0, 1.0]], dtype=torch.float64)
    rel_a, rel_b = relevance.product_relevance(a, b, r)
    torch.testing.assert_close(
        rel_a, torch.tensor([[2.5, 9.0]], dtype=torch.float64), rtol=1e-8, atol=0
    )
    torch.testing.assert_close(
        rel_b, torch.tensor([[3.0, -0.5], [8.0, 1.0]], dtype=torch.float64), rtol=1e-8, atol=0
    )
    # The scale of scale·Q·Kᵀ cancels in the z-rule.
    scaled = relevance.product_relevance(a, b, r, 0.5)
    torch.testing.assert_close(scaled[0], rel_a, rtol=1e-8, atol=0)


def test_residual_add_normalisation_by_hand() -> None:
    # Image 0: z = (2, 2); z-rule R_x = (1, 6), R_f = (1, −2); totals 7 and −1 of Σ R = 6 become
    # 7/8·6 = 5.25 and 1/8·6 = 0.75: R_x = (1, 6)·5.25/7, R_f = (1, −2)·0.75/(−1).
    # Image 1 is normalised on its own: both branches already carry 1 each.
    x = torch.tensor([[1.0, 3.0], [2.0, 0.0]], dtype=torch.float64)
    f = torch.tensor([[1.0, -1.0], [0.0, 2.0]], dtype=torch.float64)
    r = torch.tensor([[2.0, 4.0], [1.0, 1.0]], dtype=torch.float64)
    rel_x, rel_f = relevance.residual_relevance(x, f, r)
    torch.testing.assert_close(rel_x, torch.tensor([[0.75, 4.5], [1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(rel_f, torch.tensor([[-0.75, 1.5], [0.0, 1.0]], dtype=torch.float64))


def test_average_pool_z_rule_by_hand() -> None:
    tokens = torch.tensor([[[5.0], [1.0], [3.0]]], dtype=torch.float64)  # prefix token, 2 patches
    out = relevance.mean_relevance(
        tokens, tokens[:, 1:].mean(1), torch.tensor([[4.0]], dtype=torch.float64), 1
    )
    torch.testing.assert_close(out, torch.tensor([[[0.0], [1.0], [3.0]]], dtype=torch.float64))


def test_each_rule_conserves_relevance_on_random_tensors(monkeypatch) -> None:
    monkeypatch.setattr(
        relevance, "EPS", 0.0
    )  # without the stabiliser each rule is exactly conservative
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    r = randn(2, 5, 7)
    # 24 inputs as in the tiny ViT: a z with no positive contribution (dropped) is a 2⁻²⁴ event.
    linear = relevance.linear_relevance(randn(2, 5, 24), randn(7, 24), r)
    assert linear.sum().item() == pytest.approx(r.sum().item(), rel=1e-12)
    rel_a, rel_b = relevance.product_relevance(randn(2, 5, 3), randn(2, 3, 7), r, 0.3)
    for share in (rel_a, rel_b):
        assert share.sum().item() == pytest.approx(r.sum().item() / 2, rel=1e-12)
    rel_x, rel_f = relevance.residual_relevance(randn(2, 5, 7), randn(2, 5, 7), r)
    torch.testing.assert_close((rel_x + rel_f).sum((1, 2)), r.sum((1, 2)), rtol=1e-12, atol=0)
    tokens, pooled_r = randn(2, 6, 7), randn(2, 7)
    pooled = relevance.mean_relevance(tokens, tokens[:, 2:].mean(1), pooled_r, 2)
    torch.testing.assert_close(pooled.sum(1), pooled_r, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------- conservation in models


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conservation_block_by_block_and_rule_by_rule(variant, monkeypatch) -> None:
    """Σ R is 1 (the one-hot start) at every block's input and output, for each image.

    The rules leave no room for bias terms (the α1β0 denominators exclude the bias, the
    skip-connection rule rescales to the incoming total), so with ε = 0 conservation is exact
    even though these models have non-zero biases; ε = 1e-9 leaks at most ~1e-6 per block.
    """
    model = _model(variant, seed=2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    targets = torch.tensor([0, 4])
    rec = record(model, x, targets, lrp=True)
    one = torch.ones(2, dtype=torch.float64)
    rel = relevance.output_relevance(rec, targets)
    torch.testing.assert_close(rel.sum((1, 2)), one, rtol=1e-6, atol=0)  # with ε
    monkeypatch.setattr(relevance, "EPS", 0.0)
    rel = relevance.output_relevance(rec, targets)

    def total(name: str) -> torch.Tensor:
        return trace[name].flatten(1).sum(1)  # (B,)

    for layer in reversed(range(rec.num_layers)):
        trace: dict[str, torch.Tensor] = {}
        rel, _ = relevance.block_relevance(rec, layer, rel, trace)
        checks = [
            (total("out"), total("mid_skip") + total("mlp_out")),  # second skip connection
            (total("mlp_out"), total("hidden")),  # fc2
            (total("hidden"), total("mid_branch")),  # fc1
            (total("mid"), total("mid_skip") + total("mid_branch")),  # clone
            (total("mid"), total("x_skip") + total("attn_out")),  # first skip connection
            (total("attn_out"), total("heads_out")),  # proj
            (total("heads_out") / 2, total("attn")),  # A·V, halved
            (total("heads_out") / 2, total("v")),
            (total("attn") / 2, total("q")),  # scale·Q·Kᵀ, halved
            (total("attn") / 2, total("k")),
            (total("qkv"), total("q") + total("k") + total("v")),  # clone into q, k, v
            (total("qkv"), total("x_branch")),  # qkv
            (total("x"), total("x_skip") + total("x_branch")),  # clone
            (total("x"), one),
        ]
        for got, want in checks:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


# ------------------------------------------------------------------ engine, model, capture


def test_engine_runs_partial_lrp_without_a_backward_pass(monkeypatch) -> None:
    loaded = tiny_loaded(seed=6, dtype=torch.float64)
    explainer = Explainer(loaded)
    pixels = torch.rand(
        3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    classes = (4, 0, 2)
    x = (pixels - 0.5) / 0.5  # the tiny model's normalisation
    targets = torch.tensor(classes)
    rec = record(loaded.module, x, targets, lrp=True)
    with torch.no_grad():
        want = {
            name: get_method(name).fn(rec, targets, NoParams())
            for name in ("partial_lrp", "transformer_attribution")
        }

    def no_backward(*_args, **_kwargs):
        raise AssertionError("partial_lrp must not run a backward pass")

    with monkeypatch.context() as patch:
        patch.setattr(torch.autograd, "grad", no_backward)
        job = ExplainJob(
            pixels,
            get_method("partial_lrp"),
            NoParams(),
            TargetSpec("per_image", classes),
            relevance=True,
        )
        got = explainer.explain(job)
    np.testing.assert_allclose(got.heatmaps[:, 0], want["partial_lrp"].heatmap.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        got.relevance[:, 0], want["partial_lrp"].relevance.numpy(), rtol=1e-6, atol=1e-12
    )
    job = ExplainJob(
        pixels,
        get_method("transformer_attribution"),
        NoParams(),
        TargetSpec("per_image", classes),
        relevance=True,
    )
    got = explainer.explain(job)
    np.testing.assert_allclose(
        got.heatmaps[:, 0], want["transformer_attribution"].heatmap.numpy(), rtol=1e-6
    )
    np.testing.assert_allclose(
        got.relevance[:, 0], want["transformer_attribution"].relevance.numpy(), rtol=1e-6
    )
    explainer.close()


@pytest.mark.parametrize("name", ["partial_lrp", "transformer_attribution"])
def test_explaining_leaves_the_model_as_it_was(name) -> None:
    loaded = tiny_loaded(seed=7)
    module = loaded.module.requires_grad_(True)  # stricter than serving: weights could take .grad
    before = copy.deepcopy(module.state_dict())
    explainer = Explainer(loaded)
    result = explainer.explain(
        ExplainJob(torch.rand(2, 3, 32, 32), get_method(name), NoParams(), TargetSpec("top_k", k=2))
    )
    assert result.heatmaps.shape == (2, 2, 4, 4) and np.isfinite(result.heatmaps).all()
    assert all(p.grad is None and p.requires_grad for p in module.parameters())
    assert all(block.attn.fused_attn for block in module.blocks)
    assert module.state_dict().keys() == before.keys()
    assert all(torch.equal(value, before[key]) for key, value in module.state_dict().items())
    explainer.close()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def test_lrp_walk_builds_no_graph_on_trainable_weights() -> None:
    model = _model("plain")
    targets = torch.tensor([2])
    rec = record(model, torch.randn(1, 3, 32, 32, dtype=torch.float64), targets, lrp=True)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(rel.requires_grad for rel in relevance.attention_relevances(rec, targets))
    assert not transformer_attribution_relevance(rec, targets).requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_capture_without_lrp_is_unchanged_and_lrp_hooks_are_inert() -> None:
    model = tiny_vit(seed=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
    hooks = AttentionHooks(model)
    recs = {}
    for lrp_on in (False, True):
        with hooks.record(lrp=lrp_on) as recs[lrp_on], torch.no_grad():
            assert torch.equal(model(x), plain)
    with hooks.record() as default, torch.no_grad():
        model(x)
    assert recs[False].lrp is None and default.lrp is None
    for off, on in zip(recs[False].layers, recs[True].layers, strict=True):
        for field in ("q", "k", "v", "out"):
            assert torch.equal(getattr(off, field), getattr(on, field))
    assert torch.equal(recs[False].tokens, recs[True].tokens)
    kept = recs[True].lrp
    first = [kept.layers[0].x, kept.head_in[0]]
    assert all(t is not None for layer in kept.layers for t in vars(layer).values())
    with torch.no_grad():
        model(x + 1)  # outside a recording: the hooks keep nothing
    assert kept.layers[0].x is first[0] and kept.head_in[0] is first[1]
    hooks.close()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_models_without_lrp_rules_are_rejected_before_queueing() -> None:
    for overrides, message in [
        ({"global_pool": "map"}, "reads"),  # attention pooling: the methods' readouts
        ({"mlp_layer": GluMlp}, "LRP rules cover"),  # a block layout without rules
    ]:
        explainer = Explainer(tiny_loaded(**overrides))
        explainer.check(get_method("cam"), NoParams(), TargetSpec())  # others still run
        for name in ("partial_lrp", "transformer_attribution"):
            with pytest.raises(InvalidArgument, match=message):
                explainer.check(get_method(name), NoParams(), TargetSpec())
        with pytest.raises(TypeError, match="LRP"), explainer.hooks.record(lrp=True):
            pass
        explainer.close()
