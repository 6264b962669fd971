"""I-SAW against a plain loop written from its documented equations (float64, tiny ViT).

The reference takes A_l and ∂y/∂A_l from timm's unfused attention (tests/tiny.py), so the capture,
the readout row and the method math are all checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny import tiny_loaded, tiny_vit, unfused_attention_and_grads
from vitlens_server.errors import InvalidArgument
from vitlens_server.explain import Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.params import parse_params
from vitlens_server.explain.recording import record
from vitlens_server.explain.records import Recording

GRID = (4, 4)


@pytest.fixture(scope="module")
def case() -> dict:
    """A float64 tiny ViT (class token), 3 images, their recording and unfused references."""
    model = tiny_vit(seed=1, dtype=torch.float64)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([2, 0, 4])
    _, maps, grads = unfused_attention_and_grads(model, x, targets)
    return {
        "rec": record(model, x, targets),
        "targets": targets,
        "A": [a.numpy() for a in maps],  # per layer (B, H, N, N)
        "dA": [g.numpy() for g in grads],
    }


def _run(rec: Recording, targets: torch.Tensor, **options) -> torch.Tensor:
    spec = get_method("isaw")
    with torch.no_grad():
        return spec.fn(rec, targets, parse_params(spec.params, options, method="isaw")).heatmap


def _isaw_reference(maps, grads, b: int, rows: list[int], prefix: int, start: int = 0):
    """docs/methods.md "I-SAW", one image, plain loops.

    g_{l,h} = (1/J) Σ_j ∇A_l[h, r, P+j];  A_c^(l)_j = (1/H) Σ_h g_{l,h} A_l[h, r, P+j];
    S = Σ_{l ≥ s} A_c^(l) / (L − s);  map = (S − min S) / (max S − min S).
    Row r is the mean of the token rows ``rows`` the classifier reads.
    """
    heads, n = maps[0].shape[1], maps[0].shape[-1]
    patches = n - prefix

    def row(matrix, h: int, j: int) -> float:  # the readout row's entry for patch j
        return sum(matrix[b, h, r, prefix + j] for r in rows) / len(rows)

    total = [0.0] * patches
    for layer in range(start, len(maps)):
        attn, grad = maps[layer], grads[layer]
        weights = [sum(row(grad, h, j) for j in range(patches)) / patches for h in range(heads)]
        for j in range(patches):
            mixed = sum(weights[h] * row(attn, h, j) for h in range(heads)) / heads
            total[j] += mixed / (len(maps) - start)
    low, high = min(total), max(total)
    return np.array([(t - low) / (high - low) for t in total])


@pytest.mark.parametrize("start", [0, 1, 2])
def test_isaw_matches_the_loop_reference(case, start: int) -> None:
    out = _run(case["rec"], case["targets"], start_layer=start)
    assert out.shape == (3, *GRID) and out.dtype == torch.float64
    for b in range(3):
        ref = _isaw_reference(case["A"], case["dA"], b, rows=[0], prefix=1, start=start)
        np.testing.assert_allclose(out[b].numpy(), ref.reshape(GRID), rtol=1e-9, atol=1e-12)


def test_isaw_maps_span_exactly_zero_to_one(case) -> None:
    out = _run(case["rec"], case["targets"]).flatten(1)
    torch.testing.assert_close(out.amin(dim=1), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(out.amax(dim=1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize(("scale", "flipped"), [(3.0, False), (-0.5, True)])
def test_isaw_ignores_the_gradient_scale_and_flips_with_its_sign(case, scale, flipped) -> None:
    """Min-max of Σ α g A: a positive scale of every gradient changes nothing, a negative one
    turns the map into 1 − map (a ReLU anywhere, or another normalisation, would break this)."""
    rec: Recording = case["rec"]
    before = _run(rec, case["targets"])
    scaled = rec.with_gradients([layer.out_grad * scale for layer in rec.layers])
    after = _run(scaled, case["targets"])
    torch.testing.assert_close(after, 1 - before if flipped else before, rtol=0, atol=1e-12)


def test_isaw_with_zero_gradients_is_all_zeros_not_nan(case) -> None:
    rec: Recording = case["rec"]
    zeros = rec.with_gradients([torch.zeros_like(layer.out_grad) for layer in rec.layers])
    out = _run(zeros, case["targets"])
    torch.testing.assert_close(out, torch.zeros(3, *GRID, dtype=torch.float64))


@pytest.mark.parametrize(
    ("overrides", "rows"),
    [
        ({"arch": "deit_tiny_distilled_patch16_224"}, "distilled"),
        ({"global_pool": "avg", "class_token": False}, "avg"),
    ],
    ids=["distilled", "avg_pool"],
)
def test_isaw_follows_the_readout_rows(overrides: dict, rows: str) -> None:
    model = tiny_loaded(seed=4, **overrides).module.double()
    prefix = int(model.num_prefix_tokens)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([1, 3])
    out = _run(record(model, x, targets), targets)
    _, maps, grads = unfused_attention_and_grads(model, x, targets)
    maps, grads = [a.numpy() for a in maps], [g.numpy() for g in grads]
    n = maps[0].shape[-1]
    readout = [0, 1] if rows == "distilled" else list(range(prefix, n))
    for b in range(2):
        ref = _isaw_reference(maps, grads, b, rows=readout, prefix=prefix)
        np.testing.assert_allclose(out[b].numpy(), ref.reshape(GRID), rtol=1e-8, atol=1e-11)


def _explain(explainer: Explainer, x: torch.Tensor, target: TargetSpec, **options) -> np.ndarray:
    spec = get_method("isaw")
    params = parse_params(spec.params, options, method="isaw")
    explainer.check(spec, params, target)
    return explainer.explain(ExplainJob(x, spec, params, target)).heatmaps  # (B, K, gh, gw)


def test_isaw_is_class_specific() -> None:
    explainer = Explainer(tiny_loaded(seed=2))
    x = torch.rand(2, 3, 32, 32)
    maps = [_explain(explainer, x, TargetSpec("index", (c,)))[:, 0] for c in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            for image in range(2):
                assert np.abs(maps[a][image] - maps[b][image]).max() > 1e-2, (a, b, image)
    top2 = _explain(explainer, x, TargetSpec("top_k", k=2))
    assert np.abs(top2[:, 0] - top2[:, 1]).max() > 1e-2


def test_isaw_batched_equals_one_image_at_a_time() -> None:
    explainer = Explainer(tiny_loaded(seed=3))
    x = torch.rand(4, 3, 32, 32)
    classes = (1, 0, 4, 2)
    batched = _explain(explainer, x, TargetSpec("per_image", classes), start_layer=1)
    assert batched.shape == (4, 1, *GRID)
    for b in range(4):
        single = _explain(
            explainer, x[b : b + 1], TargetSpec("index", (classes[b],)), start_layer=1
        )
        np.testing.assert_allclose(batched[b], single[0], rtol=1e-4, atol=1e-5)


def test_isaw_rejects_a_start_layer_past_the_last_block() -> None:
    explainer = Explainer(tiny_loaded(seed=3))
    with pytest.raises(InvalidArgument, match=r"isaw.start_layer must be below .* 3 layers"):
        _explain(explainer, torch.rand(1, 3, 32, 32), TargetSpec(), start_layer=3)
