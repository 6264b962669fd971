"""The capture hooks rebuild exactly what timm's unfused attention computes, and leave no trace."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.tiny import tiny_loaded, tiny_vit, unfused_attention_and_grads
from vitlens_server.explain import Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.capture import AttentionHooks, UnsupportedModel
from vitlens_server.explain.params import NoParams


def _record(model, x, targets):
    hooks = AttentionHooks(model)
    try:
        with hooks.record() as rec, torch.enable_grad():
            x = x.clone().requires_grad_(True)
            logits = model(x)
            grads = torch.autograd.grad(
                logits.gather(1, targets[:, None]).sum(), rec.attention_outputs()
            )
            for layer, grad in zip(rec.layers, grads, strict=True):
                layer.out_grad = grad
        return rec, logits.detach()
    finally:
        hooks.close()


def test_attention_and_gradients_match_unfused_timm() -> None:
    model = tiny_vit(dtype=torch.float64)
    assert all(block.attn.fused_attn for block in model.blocks), "test needs the fused path"
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([0, 3, 1])
    rec, logits = _record(model, x, targets)
    ref_logits, ref_maps, ref_grads = unfused_attention_and_grads(model, x, targets)
    torch.testing.assert_close(logits, ref_logits)
    for layer in range(rec.num_layers):
        torch.testing.assert_close(rec.attention(layer), ref_maps[layer])
        torch.testing.assert_close(rec.attention_grad(layer), ref_grads[layer])
        scores = rec.scores(layer)
        torch.testing.assert_close(scores.softmax(-1), ref_maps[layer])


def test_hooks_are_inert_outside_a_recording_and_removed_on_close() -> None:
    model = tiny_vit()
    before = copy.deepcopy(model.state_dict())
    hooks = AttentionHooks(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))  # not recording: nothing kept
    with hooks.record() as rec, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert rec.layers[0].q is not None and rec.layers[0].q.shape == (2, 3, 17, 8)
    with hooks.record() as idle:
        pass
    assert all(layer.q is None for layer in idle.layers)
    hooks.close()
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(block.attn.fused_attn for block in model.blocks)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_nested_recordings_are_refused() -> None:
    hooks = AttentionHooks(tiny_vit())
    with hooks.record(), pytest.raises(RuntimeError, match="already active"), hooks.record():
        pass
    hooks.close()


def test_models_without_timm_attention_are_refused() -> None:
    model = tiny_vit()
    model.blocks[1].attn = torch.nn.Identity()
    with pytest.raises(UnsupportedModel, match="block 1"):
        AttentionHooks(model)


def test_explaining_leaves_no_gradients_and_keeps_the_fused_path() -> None:
    loaded = tiny_loaded()
    explainer = Explainer(loaded)
    method = get_method("generic")
    job = ExplainJob(torch.rand(2, 3, 32, 32), method, NoParams(), TargetSpec("top_k", k=2))
    result = explainer.explain(job)
    assert result.heatmaps.shape == (2, 2, 4, 4)
    assert all(p.grad is None and not p.requires_grad for p in loaded.module.parameters())
    assert all(block.attn.fused_attn for block in loaded.module.blocks)
    explainer.close()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.module.modules())
