"""The capture hooks rebuild exactly what timm's unfused attention computes, and leave no trace."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from tests.tiny import tiny_loaded, tiny_vit, unfused_attention_and_grads
from vitlens_server.explain import Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.capture import AttentionHooks, UnsupportedModel
from vitlens_server.explain.params import NoParams, parse_params
from vitlens_server.explain.recording import capture, record


def test_attention_and_gradients_match_unfused_timm() -> None:
    model = tiny_vit(dtype=torch.float64)
    assert all(block.attn.fused_attn for block in model.blocks), "test needs the fused path"
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([0, 3, 1])
    hooks = AttentionHooks(model)
    try:
        captured = capture(hooks, x, gradients=True)
    finally:
        hooks.close()
    rec = captured.gradients(targets)
    ref_logits, ref_maps, ref_grads = unfused_attention_and_grads(model, x, targets)
    torch.testing.assert_close(captured.logits.detach(), ref_logits)
    assert all(layer.out_grad is None for layer in captured.recording.layers)  # left unchanged
    for layer in range(rec.num_layers):
        torch.testing.assert_close(rec.attention(layer), ref_maps[layer])
        torch.testing.assert_close(rec.attention_grad(layer), ref_grads[layer])
        scores = rec.scores(layer)
        torch.testing.assert_close(scores.softmax(-1), ref_maps[layer])


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_on_the_model_only_while_a_recording_is_active() -> None:
    """Passes outside a recording (Predict, the re-runs of IG and token reflection) run the bare
    model; the LRP hooks join only recordings that ask for them; nested users of two threads
    keep them attached until the last one ends."""
    model = tiny_vit()
    hooks = AttentionHooks(model)
    assert _hook_count(model) == 0 and not hooks.attached
    with hooks.record():
        attention_only = _hook_count(model)
        # q, k, v, O and the map of each block (the map only when formed), the final tokens
        assert attention_only == 5 * len(model.blocks) + 1 and hooks.attached
    assert _hook_count(model) == 0
    with hooks.record(lrp=True):
        assert _hook_count(model) > attention_only
    assert _hook_count(model) == 0
    entered, leave = threading.Event(), threading.Event()

    def other() -> None:
        with hooks.record():
            entered.set()
            leave.wait(timeout=30)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert entered.wait(timeout=30)
        with hooks.record(lrp=True):
            pass
        assert _hook_count(model) == attention_only  # the other thread still records
    finally:
        leave.set()
        thread.join()
    assert _hook_count(model) == 0
    hooks.close()


def test_a_recording_with_maps_keeps_the_maps_its_pass_formed() -> None:
    """maps=True: this thread runs timm's unfused attention and keeps each A_l as formed (equal
    to the rebuilt softmax(scale q kᵀ)); a pass of another thread meanwhile stays fused; the
    flag is timm's plain bool again after, and a copy made meanwhile gets the plain value."""
    model = tiny_vit(seed=5, dtype=torch.float64)
    hooks = AttentionHooks(model)
    assert hooks.forms_maps
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with hooks.record() as plain, torch.no_grad():
        model(x)
    assert all(layer.attn is None for layer in plain.layers)
    seen: list[bool] = []

    def other_thread() -> None:
        seen.append(bool(model.blocks[0].attn.fused_attn))

    with hooks.record(maps=True) as rec, torch.no_grad():
        assert not model.blocks[0].attn.fused_attn  # this thread: unfused
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        copied = copy.deepcopy(model)
        model(x)
    assert seen == [True]
    assert all(type(b.attn.fused_attn) is bool and b.attn.fused_attn for b in copied.blocks)
    assert all(type(b.attn.fused_attn) is bool and b.attn.fused_attn for b in model.blocks)
    for layer in range(rec.num_layers):
        assert rec.layers[layer].attn is not None
        torch.testing.assert_close(rec.attention(layer), plain.attention(layer))
        torch.testing.assert_close(rec.attention(layer), rec.scores(layer).softmax(-1))
    hooks.close()


def test_explainer_predict_runs_the_bare_model() -> None:
    """Predict and the logits of a loaded model's `Explainer` go through no hook at all."""
    loaded = tiny_loaded()
    explainer = Explainer(loaded)
    try:
        calls = []
        spy = loaded.module.blocks[0].attn.qkv.register_forward_hook(
            lambda module, _i, _o: calls.append(len(module._forward_hooks))
        )
        explainer.predict(torch.rand(2, 3, 32, 32), top_k=1)
        spy.remove()
        assert calls == [1]  # the spy alone
        assert _hook_count(loaded.module) == 0
    finally:
        explainer.close()


def test_hooks_are_inert_outside_a_recording_and_removed_on_close() -> None:
    model = tiny_vit()
    before = copy.deepcopy(model.state_dict())
    hooks = AttentionHooks(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))  # not recording: nothing kept
    with hooks.record() as rec, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        copied = copy.deepcopy(model)  # a recording model deep-copies
    assert rec.layers[0].q is not None and rec.layers[0].q.shape == (2, 3, 17, 8)
    assert _hook_count(copied) > 0
    with hooks.record() as idle:
        pass
    assert all(layer.q is None for layer in idle.layers)
    hooks.close()
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(block.attn.fused_attn for block in model.blocks)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_gradients_of_each_rank_are_new_recordings_of_one_capture() -> None:
    """Two backward passes of one forward: weights pick the images, neither call changes the
    capture, and each equals `record` with its own targets."""
    model = tiny_vit(seed=2, dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    hooks = AttentionHooks(model)
    try:
        captured = capture(hooks, x, gradients=True)
    finally:
        hooks.close()
    first = captured.gradients(torch.tensor([1, 2]), retain=True)
    second = captured.gradients(torch.tensor([4, 0]), torch.tensor([1.0, 0.0], dtype=x.dtype))
    assert all(layer.out_grad is None for layer in captured.recording.layers)
    for layer in range(first.num_layers):
        want = record(model, x, torch.tensor([1, 2])).attention_grad(layer)
        torch.testing.assert_close(first.attention_grad(layer), want)
        want = record(model, x[:1], torch.tensor([4])).attention_grad(layer)
        torch.testing.assert_close(second.attention_grad(layer)[:1], want)
        assert not second.attention_grad(layer)[1].any()  # weight 0: no gradient


def test_two_threads_record_their_own_passes_at_the_same_time() -> None:
    """Both forward passes are inside the model at once (a barrier in block 1 holds each until
    the other arrives); each thread's recording holds exactly its own input's tensors."""
    model = tiny_vit(seed=4)
    inputs = [torch.randn(b, 3, 32, 32) for b in (1, 3)]
    want = [record(model, x) for x in inputs]
    hooks = AttentionHooks(model)
    barrier = threading.Barrier(2, timeout=30)

    def meet(_module, _inputs) -> None:
        barrier.wait()  # block 0 of both passes is recorded; blocks 1 and 2 come after

    meeting = model.blocks[1].register_forward_pre_hook(meet)
    got: list = [None, None]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with hooks.record() as rec, torch.no_grad():
                model(inputs[i])
            got[i] = rec
        except BaseException as err:
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        meeting.remove()
        hooks.close()
    assert not errors, errors
    for rec, ref in zip(got, want, strict=True):
        for layer, expected in zip(rec.layers, ref.layers, strict=True):
            for field in ("q", "k", "v", "out"):
                assert torch.equal(getattr(layer, field), getattr(expected, field)), field
        assert torch.equal(rec.tokens, ref.tokens)


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


def test_the_engine_forms_maps_in_forward_only_cpu_passes_only() -> None:
    """On CPU in fp32 a forward-only batch runs timm's unfused attention (its attn_drop is
    called); a batch with gradients keeps the fused kernel; both give the reference maps."""
    loaded = tiny_loaded(seed=6)
    explainer = Explainer(loaded)
    calls = []
    spy = loaded.module.blocks[0].attn.attn_drop.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(2, 3, 32, 32)
    try:
        for name, formed in (("rollout", True), ("generic", False)):
            calls.clear()
            spec = get_method(name)
            job = ExplainJob(x, spec, parse_params(spec.params, {}, method=name), TargetSpec())
            explainer.explain(job)
            assert bool(calls) is formed, name
    finally:
        spy.remove()
        explainer.close()
