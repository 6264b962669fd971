"""Model families: class token, registers, DeiT distilled, average pooling, attention pooling.

The readout row (`Recording.readout`) must be exactly how each model's head reads its tokens, and
row-reading methods must follow it — or be refused up front where no fixed row exists.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny import tiny_loaded, unfused_attention_and_grads
from vitlens_server.errors import InvalidArgument
from vitlens_server.explain import Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.params import parse_params

FAMILIES = {
    "class_token": ({}, "token", 1),
    "registers": ({"reg_tokens": 2}, "token", 3),
    "distilled": ({"arch": "deit_tiny_distilled_patch16_224"}, "distilled", 2),
    "avg_pool": ({"global_pool": "avg", "class_token": False}, "avg", 0),
    "avg_pool_with_cls": ({"global_pool": "avg"}, "avg", 1),
}


def _explain(model, method: str, pixels: torch.Tensor, **options):
    spec = get_method(method)
    params = parse_params(spec.params, options, method=method)
    target = TargetSpec()
    explainer = Explainer(model)
    try:
        explainer.check(spec, params, target)
        job = ExplainJob(pixels, spec, params, target, relevance=spec.relevance_matrix)
        return explainer.explain(job)
    finally:
        explainer.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_readout_is_how_the_head_reads_the_tokens(family: str) -> None:
    overrides, kind, prefix = FAMILIES[family]
    model = tiny_loaded(seed=3, **overrides)
    assert model.geometry.readout == kind and model.geometry.num_prefix_tokens == prefix
    explainer = Explainer(model)
    x = torch.randn(2, 3, 32, 32)
    with explainer.hooks.record() as rec, torch.no_grad():
        features = model.module.forward_features(x)  # (B, N, D)
        pooled = model.module.forward_head(features, pre_logits=True)  # (B, D)
    explainer.close()
    mixed = torch.einsum("n,bnd->bd", rec.readout, features)
    torch.testing.assert_close(model.module.fc_norm(mixed) if kind == "avg" else mixed, pooled)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_raw_attention_follows_the_readout(family: str) -> None:
    overrides, _kind, prefix = FAMILIES[family]
    model = tiny_loaded(seed=3, **overrides)
    x = torch.rand(2, 3, 32, 32)
    result = _explain(model, "raw_attention", x)
    explainer = Explainer(model)
    inputs = explainer.normalize(x)
    explainer.close()
    with torch.no_grad():
        logits = model.module(inputs)
    _, maps, _ = unfused_attention_and_grads(model.module, inputs, logits.argmax(1))
    last = maps[-1].mean(dim=1).numpy()  # (B, N, N)
    n = last.shape[-1]
    rows = {"token": [0], "distilled": [0, 1], "avg": list(range(prefix, n))}[_kind]
    for b in range(2):
        expected = np.mean([last[b, r, prefix:] for r in rows], axis=0).reshape(4, 4)
        np.testing.assert_allclose(result.heatmaps[b, 0], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["generic", "gradcam", "agcam", "rollout", "cam", "saliency"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_methods_run_on_every_family(family: str, method: str) -> None:
    model = tiny_loaded(seed=3, **FAMILIES[family][0])
    result = _explain(model, method, torch.rand(2, 3, 32, 32))
    assert result.heatmaps.shape[:2] == (2, 1) and np.isfinite(result.heatmaps).all()


def test_attention_pooling_refuses_row_methods_but_not_cam() -> None:
    model = tiny_loaded(seed=3, global_pool="map")
    assert model.geometry.readout == "map"
    with pytest.raises(InvalidArgument, match=r"'rollout'.*reads 'map'.*GetModel"):
        _explain(model, "rollout", torch.rand(1, 3, 32, 32))
    assert np.isfinite(_explain(model, "saliency", torch.rand(1, 3, 32, 32)).heatmaps).all()
