"""Each method against a plain loop written from its paper's equations (float64, tiny ViT).

References take A_l and ∂y/∂A_l from timm's unfused attention (tests/tiny.py), so both the
capture and the method math are checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny import TINY_ARCH, tiny_loaded, tiny_vit, unfused_attention_and_grads
from vitlens_server.explain import (
    METHODS,
    Cost,
    Explainer,
    ExplainJob,
    Pass,
    TargetSpec,
    get_method,
)
from vitlens_server.explain.methods.attention import RolloutParams
from vitlens_server.explain.params import NoParams, parse_params
from vitlens_server.explain.recording import record
from vitlens_server.explain.records import Recording

P = 1  # prefix tokens of the tiny ViT (class token)
GRID = (4, 4)


@pytest.fixture(scope="module")
def case() -> dict:
    """A float64 tiny ViT, a batch of 3 images and their recording and unfused references."""
    model = tiny_vit(seed=1, dtype=torch.float64)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([2, 0, 4])
    rec = record(model, x, targets)
    _, maps, map_grads = unfused_attention_and_grads(model, x, targets)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, N, D) after the final norm
    return {
        "rec": rec,
        "tokens": tokens.numpy(),
        "classifier": model.head.weight.detach().numpy(),
        "targets": targets.tolist(),
        "A": [a.numpy() for a in maps],  # per layer (B, H, N, N)
        "dA": [g.numpy() for g in map_grads],
    }


def _run(case: dict, name: str, rec: Recording | None = None, **options):
    """Method ``name`` on the case's recording (or ``rec``) for the case's targets."""
    spec = get_method(name)
    targets = torch.tensor(case["targets"])
    with torch.no_grad():
        return spec.fn(
            case["rec"] if rec is None else rec,
            targets,
            parse_params(spec.params, options, method=name),
        )


def _cls_map(matrix: np.ndarray) -> np.ndarray:
    return matrix[0, P:].reshape(GRID)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = a.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = sum(a[i, k] * b[k, j] for k in range(n))
    return out


def test_raw_attention_is_the_last_layers_head_mean_cls_row(case) -> None:
    out = _run(case, "raw_attention")
    last = case["A"][-1]
    batch, heads, n, _ = last.shape
    for b in range(batch):
        mean = np.zeros((n, n))
        for h in range(heads):
            mean += last[b, h] / heads
        np.testing.assert_allclose(out.heatmap[b].numpy(), _cls_map(mean), rtol=1e-9)
        np.testing.assert_allclose(out.relevance[b].numpy(), mean, rtol=1e-9)


def _rollout_reference(maps, b, fusion="mean", discard=0.0, start=0) -> np.ndarray:
    """Abnar & Zuidema: R = Ã_L ··· Ã_s, Ã_l = norm_rows(fuse_h(A_l) + I)."""
    n = maps[0].shape[-1]
    result = np.eye(n)
    for layer in range(start, len(maps)):
        heads = maps[layer][b]
        fused = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                column = [heads[h, i, j] for h in range(heads.shape[0])]
                fused[i, j] = {"mean": np.mean, "max": max, "min": min}[fusion](column)
        if discard:
            order = sorted(range(n * n), key=lambda k: fused.flat[k])
            for k in order[: int(n * n * discard)]:
                fused.flat[k] = 0.0
        augmented = fused + np.eye(n)
        for i in range(n):
            augmented[i] /= sum(augmented[i])
        result = _matmul(augmented, result)
    return result


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"head_fusion": "max"},
        {"head_fusion": "min", "discard_ratio": 0.5},
        {"start_layer": 1, "discard_ratio": 0.2},
    ],
    ids=["mean", "max", "min-discard", "start-layer"],
)
def test_rollout_matches_the_loop_reference(case, options) -> None:
    out = _run(case, "rollout", **options)
    for b in range(3):
        ref = _rollout_reference(
            case["A"],
            b,
            options.get("head_fusion", "mean"),
            options.get("discard_ratio", 0.0),
            options.get("start_layer", 0),
        )
        np.testing.assert_allclose(out.relevance[b].numpy(), ref, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(out.heatmap[b].numpy(), _cls_map(ref), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["rollout", "transformer_attribution"])
def test_maps_without_relevance_are_the_readout_row_of_the_full_product(name: str) -> None:
    """When the caller reads no relevance the readout row is formed alone, from the left: the
    same map (to float64 rounding) and no matrix. Explain requests with and without
    return_relevance give the same maps; DeiT's distilled readout (two rows) included."""
    for arch in (TINY_ARCH, "deit_tiny_distilled_patch16_224"):
        model = tiny_loaded(seed=3, arch=arch)
        model.module.double()
        explainer = Explainer(model)
        x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
        spec = get_method(name)
        params = parse_params(spec.params, {}, method=name)
        results = [
            explainer.explain(ExplainJob(x, spec, params, TargetSpec("top_k", k=2), relevance=r))
            for r in (True, False)
        ]
        full, row_only = results
        assert full.relevance is not None and row_only.relevance is None
        assert full.heatmaps.std() > 0
        np.testing.assert_allclose(row_only.heatmaps, full.heatmaps, rtol=1e-9, atol=1e-12)
        explainer.close()


def test_rollout_rows_sum_to_one(case) -> None:
    out = _run(case, "rollout", head_fusion="max", discard_ratio=0.3)
    torch.testing.assert_close(out.relevance.sum(-1), torch.ones(3, 17, dtype=torch.float64))


def test_generic_matches_chefer_eq_5_6(case) -> None:
    """Ā_l = E_h((∇A_l ⊙ A_l)⁺); R = I; R ← R + Ā_l R; map = R[0, P:]."""
    out = _run(case, "generic")
    for b in range(3):
        n = case["A"][0].shape[-1]
        relevance = np.eye(n)
        for attn, grad in zip(case["A"], case["dA"], strict=True):
            heads = attn.shape[1]
            weighted = np.zeros((n, n))
            for h in range(heads):
                for i in range(n):
                    for j in range(n):
                        weighted[i, j] += max(0.0, grad[b, h, i, j] * attn[b, h, i, j]) / heads
            relevance = relevance + _matmul(weighted, relevance)
        np.testing.assert_allclose(out.relevance[b].numpy(), relevance, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(out.heatmap[b].numpy(), _cls_map(relevance), rtol=1e-8)


def test_gradcam_matches_the_chefer_adaptation(case) -> None:
    """α_h = mean_j ∇A_L[h, 0, P+j]; map = ReLU(mean_h α_h A_L[h, 0, P:])."""
    out = _run(case, "gradcam")
    attn, grad = case["A"][-1], case["dA"][-1]
    batch, heads, n, _ = attn.shape
    for b in range(batch):
        ref = np.zeros(n - P)
        for h in range(heads):
            alpha = sum(grad[b, h, 0, j] for j in range(P, n)) / (n - P)
            for j in range(P, n):
                ref[j - P] += alpha * attn[b, h, 0, j] / heads
        np.testing.assert_allclose(out.heatmap[b].numpy(), np.maximum(ref, 0).reshape(GRID))
    assert out.relevance is None


def test_agcam_matches_leem_and_seo(case) -> None:
    """map = Σ_l Σ_h ReLU(∇A_l[h, 0, P:]) · sigmoid(S_l[h, 0, P:]), S = log-softmax-free scores."""
    out = _run(case, "agcam")
    rec: Recording = case["rec"]
    for b in range(3):
        ref = np.zeros(16)
        for layer, grad in enumerate(case["dA"]):
            scores = rec.scores(layer).detach().numpy()  # checked against timm in test_capture
            for h in range(grad.shape[1]):
                for j in range(P, 17):
                    sigmoid = 1 / (1 + np.exp(-scores[b, h, 0, j]))
                    ref[j - P] += max(0.0, grad[b, h, 0, j]) * sigmoid
        np.testing.assert_allclose(out.heatmap[b].numpy(), ref.reshape(GRID), rtol=1e-9)


def test_cam_scores_patch_tokens_with_the_classifier_row(case) -> None:
    """map_i = w_c · z_i over the final-norm patch tokens."""
    out = _run(case, "cam")
    tokens, weights = case["tokens"], case["classifier"]
    for b, c in enumerate(case["targets"]):
        ref = [
            sum(weights[c, d] * tokens[b, P + j, d] for d in range(tokens.shape[-1]))
            for j in range(16)
        ]
        np.testing.assert_allclose(out.heatmap[b].numpy(), np.reshape(ref, GRID), rtol=1e-9)


def _saliency_case(mode: str, max_pass_rows: int = 64, **options):
    """A float64 tiny model explained with saliency through the engine, plus a plain reference;
    ``max_pass_rows`` bounds the images of each of the engine's further passes."""
    model = tiny_loaded(seed=6)
    model.module.double()
    explainer = Explainer(model, max_pass_rows=max_pass_rows)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    classes = (3, 1)
    spec = get_method("saliency")
    params = parse_params(spec.params, {"mode": mode, **options}, method="saliency")
    job = ExplainJob(x, spec, params, TargetSpec("per_image", classes), grid="input")
    maps = explainer.explain(job).heatmaps[:, 0]  # (B, H, W)

    def logit(image: torch.Tensor, b: int) -> torch.Tensor:
        return model.module(((image - 0.5) / 0.5)[None])[0, classes[b]]

    return x, maps, logit


def _gradient(logit, image: torch.Tensor, b: int) -> np.ndarray:
    image = image.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(logit(image, b), image)
    return grad.numpy()


def test_saliency_is_the_channel_max_of_the_absolute_input_gradient() -> None:
    x, maps, logit = _saliency_case("gradient")
    for b in range(2):
        grad = _gradient(logit, x[b], b)
        ref = np.max(np.abs(grad), axis=0)
        np.testing.assert_allclose(maps[b], ref, rtol=1e-4, atol=1e-9)


# 1: a copy of the batch (2 images) per pass, over the bound; 5: two copies a pass and a
# remainder; 64: every sample / step of the batch in one or two passes
@pytest.mark.parametrize("max_pass_rows", [1, 5, 64])
def test_smoothgrad_averages_gradients_of_noisy_copies(max_pass_rows: int) -> None:
    x, maps, logit = _saliency_case("smoothgrad", max_pass_rows, samples=5, noise=0.2, seed=7)
    generator = torch.Generator().manual_seed(7)
    noises = [torch.randn(x.shape, generator=generator, dtype=torch.float64) for _ in range(5)]
    for b in range(2):
        mean = sum(_gradient(logit, x[b] + 0.2 * n[b], b) for n in noises) / 5
        np.testing.assert_allclose(maps[b], np.max(np.abs(mean), axis=0), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("max_pass_rows", [5, 64])
def test_integrated_gradients_riemann_sum_and_completeness(max_pass_rows: int) -> None:
    steps = 255  # completeness holds as the Riemann sum converges; odd: a remainder pass
    x, maps, logit = _saliency_case("integrated_gradients", max_pass_rows, steps=steps)
    for b in range(2):
        grads = sum(_gradient(logit, x[b] * k / steps, b) for k in range(1, steps + 1))
        attribution = x[b].numpy() * grads / steps
        np.testing.assert_allclose(maps[b], np.max(np.abs(attribution), axis=0), rtol=1e-4)
        # Completeness (Sundararajan et al.): attributions sum to y(x) - y(black).
        gap = (logit(x[b], b) - logit(torch.zeros_like(x[b]), b)).item()
        assert attribution.sum() == pytest.approx(gap, rel=0.05, abs=1e-3)


def test_generic_with_zero_gradients_is_the_identity_cls_row(case) -> None:
    rec: Recording = case["rec"]
    zeros = rec.with_gradients([torch.zeros_like(layer.out_grad) for layer in rec.layers])
    out = _run(case, "generic", zeros)
    assert all(layer.out_grad.abs().sum() > 0 for layer in rec.layers)  # rec is unchanged
    eye = torch.eye(17, dtype=torch.float64).expand(3, 17, 17)
    torch.testing.assert_close(out.relevance, eye)
    torch.testing.assert_close(out.heatmap, torch.zeros(3, *GRID, dtype=torch.float64))


def test_class_specific_methods_depend_on_the_target() -> None:
    explainer = Explainer(tiny_loaded(seed=2))
    x = torch.rand(1, 3, 32, 32)
    for name in [s.name for s in METHODS.specs() if s.class_specific and not s.needs_mask]:
        spec = get_method(name)
        params = parse_params(spec.params, {}, method=name)
        maps = [
            explainer.explain(ExplainJob(x, spec, params, TargetSpec("index", (c,)))).heatmaps
            for c in (0, 1)
        ]
        assert not np.allclose(maps[0], maps[1]), name


@pytest.mark.parametrize("name", [s.name for s in METHODS.specs() if not s.needs_mask])
def test_a_batch_of_b_equals_b_single_calls(name) -> None:
    explainer = Explainer(tiny_loaded(seed=3))
    spec = get_method(name)
    params = parse_params(spec.params, {}, method=name)
    x = torch.rand(4, 3, 32, 32)
    classes = (1, 0, 4, 2)
    job = ExplainJob(
        x,
        spec,
        params,
        TargetSpec("per_image", classes),
        grid="input",
        relevance=spec.relevance_matrix,
    )
    batched = explainer.explain(job)
    assert batched.heatmaps.shape == (4, 1, 32, 32)
    assert np.isfinite(batched.heatmaps).all()
    for b in range(4):
        single = explainer.explain(
            ExplainJob(
                x[b : b + 1],
                spec,
                params,
                TargetSpec("per_image", classes[b : b + 1]),
                grid="input",
                relevance=spec.relevance_matrix,
            )
        )
        np.testing.assert_allclose(single.heatmaps[0], batched.heatmaps[b], rtol=1e-4, atol=1e-6)
        if spec.relevance_matrix:
            np.testing.assert_allclose(
                single.relevance[0], batched.relevance[b], rtol=1e-4, atol=1e-6
            )
        assert single.targets[0, 0] == classes[b]


def test_top_k_explains_each_class_in_probability_order() -> None:
    explainer = Explainer(tiny_loaded(seed=4))
    x = torch.rand(2, 3, 32, 32)
    spec = get_method("generic")
    top = explainer.explain(ExplainJob(x, spec, NoParams(), TargetSpec("top_k", k=3)))
    assert top.targets.shape == (2, 3)
    np.testing.assert_array_equal(top.targets, top.predictions.indices[:, :3])
    for k in range(3):
        single = explainer.explain(
            ExplainJob(x, spec, NoParams(), TargetSpec("per_image", tuple(top.targets[:, k])))
        )
        np.testing.assert_allclose(single.heatmaps[:, 0], top.heatmaps[:, k], rtol=1e-4, atol=1e-6)


def test_rollout_start_layer_must_exist() -> None:
    explainer = Explainer(tiny_loaded())
    from vitlens_server.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="start_layer"):
        explainer.check(get_method("rollout"), RolloutParams(start_layer=3), TargetSpec())


COSTS = {
    "raw_attention": Cost.FORWARD,
    "rollout": Cost.FORWARD,
    "cam": Cost.FORWARD,
    "random": Cost.FORWARD,
    "oracle": Cost.FORWARD,
    "generic": Cost.BACKWARD,
    "gradcam": Cost.BACKWARD,
    "agcam": Cost.BACKWARD,
    "isaw": Cost.BACKWARD,
    "partial_lrp": Cost.BACKWARD,
    "transformer_attribution": Cost.BACKWARD,
    "saliency": Cost.EXTRA,
    "token_reflection": Cost.EXTRA,
    "attention_flow": Cost.HOST,
}


@pytest.mark.parametrize("spec", METHODS.specs(), ids=lambda spec: spec.name)
def test_cost_classes_follow_the_passes(spec) -> None:
    """EXTRA passes cost EXTRA, a backward or LRP pass BACKWARD, else FORWARD; HOST only where
    a method is registered host-bound."""
    assert spec.cost is COSTS[spec.name]
    if spec.host_bound:
        assert spec.cost is Cost.HOST
    elif Pass.EXTRA in spec.passes:
        assert spec.cost is Cost.EXTRA
    elif spec.passes & (Pass.BACKWARD | Pass.LRP):
        assert spec.cost is Cost.BACKWARD
    else:
        assert spec.passes == Pass.FORWARD and spec.cost is Cost.FORWARD
