"""Batched execution: many jobs from one capture equal one job at a time; failures stay local."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.tiny import tiny_loaded
from vitlens_server.errors import InvalidArgument, ResourceExhausted
from vitlens_server.explain import (
    METHODS,
    Explainer,
    ExplainJob,
    Interrupted,
    TargetSpec,
    get_method,
)
from vitlens_server.explain.params import parse_params
from vitlens_server.runtime.worker import PredictJob, _isolated, _predict_batch

JOBS = [  # method, options, target, images
    ("generic", {}, TargetSpec("top_k", k=2), 2),
    ("rollout", {"head_fusion": "max"}, TargetSpec(), 1),
    ("gradcam", {}, TargetSpec("per_image", indices=(3, 1, 0)), 3),
    ("partial_lrp", {}, TargetSpec("index", indices=(4,)), 2),
    ("transformer_attribution", {}, TargetSpec("top_k", k=3), 1),
    ("saliency", {"mode": "smoothgrad", "samples": 3}, TargetSpec(), 2),
    ("cam", {}, TargetSpec("top_k", k=2), 1),
]


def _job(method: str, options: dict, target: TargetSpec, images: int, seed: int) -> ExplainJob:
    spec = get_method(method)
    pixels = torch.rand(images, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    params = parse_params(spec.params, options, method=method)
    return ExplainJob(pixels, spec, params, target, relevance=spec.relevance_matrix)


@pytest.fixture(scope="module")
def explainer() -> Explainer:
    return Explainer(tiny_loaded(seed=4, dtype=torch.float64))


def test_a_mixed_batch_equals_each_job_alone(explainer: Explainer) -> None:
    jobs = [_job(*spec, seed=i) for i, spec in enumerate(JOBS)]
    together = explainer.explain_batch(jobs)
    for job, batched in zip(jobs, together, strict=True):
        alone = explainer.explain(job)
        assert not isinstance(batched, Exception), batched
        np.testing.assert_array_equal(batched.targets, alone.targets)
        np.testing.assert_allclose(batched.heatmaps, alone.heatmaps, rtol=1e-9, atol=1e-12)
        if job.relevance:
            np.testing.assert_allclose(batched.relevance, alone.relevance, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            batched.predictions.probabilities, alone.predictions.probabilities, rtol=1e-9
        )


def test_a_failing_method_fails_only_its_job(explainer: Explainer) -> None:
    def broken(_rec, _targets, _params):
        raise ValueError("this method is broken")

    good = _job("generic", {}, TargetSpec(), 2, seed=1)
    bad = dataclasses.replace(
        _job("generic", {}, TargetSpec(), 1, seed=2),
        method=dataclasses.replace(get_method("generic"), fn=broken),
    )
    results = explainer.explain_batch([good, bad, good])
    assert isinstance(results[1], ValueError)
    for result in (results[0], results[2]):
        np.testing.assert_allclose(result.heatmaps, explainer.explain(good).heatmaps, rtol=1e-9)


def test_a_refused_method_fails_only_its_job(explainer: Explainer) -> None:
    """``needs_mask`` methods have no recording to read in Explain: refused per job."""
    good = _job("rollout", {}, TargetSpec(), 2, seed=1)
    oracle = _job("oracle", {}, TargetSpec(), 1, seed=2)
    results = explainer.explain_batch([oracle, good])
    assert isinstance(results[0], InvalidArgument) and "only in Evaluate" in str(results[0])
    np.testing.assert_array_equal(results[1].heatmaps, explainer.explain(good).heatmaps)
    (alone,) = explainer.explain_batch([oracle])
    assert isinstance(alone, InvalidArgument)


def _counting(method: str) -> tuple[ExplainJob, list[int]]:
    """A job whose method counts its calls (calls[0])."""
    spec = get_method(method)
    calls = [0]

    def counted(rec, targets, params):
        calls[0] += 1
        return spec.fn(rec, targets, params)

    job = _job(method, {}, TargetSpec("top_k", k=3), 2, seed=5)
    return dataclasses.replace(job, method=dataclasses.replace(spec, fn=counted)), calls


def test_interruption_before_the_forward_runs_nothing(explainer: Explainer) -> None:
    job, calls = _counting("generic")
    forwards = [0]
    hook = explainer.model.module.register_forward_hook(
        lambda *_: forwards.__setitem__(0, forwards[0] + 1)
    )
    try:
        with pytest.raises(Interrupted):
            explainer.explain_batch([job], interrupted=lambda: True)
    finally:
        hook.remove()
    assert forwards[0] == 0 and calls[0] == 0


def test_interruption_between_backward_ranks(explainer: Explainer, monkeypatch) -> None:
    """generic with top_k=3 runs 3 backward passes; interrupted once the first rank's method
    ran, no second backward starts and Interrupted is raised, not kept in the job's slot."""
    job, calls = _counting("generic")
    backwards = [0]
    grad = torch.autograd.grad

    def counted_grad(*args, **kwargs):
        backwards[0] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counted_grad)
    with pytest.raises(Interrupted):
        explainer.explain_batch([job], interrupted=lambda: calls[0] >= 1)
    assert (backwards[0], calls[0]) == (1, 1)
    calls[0] = backwards[0] = 0
    explainer.explain_batch([job], interrupted=lambda: False)
    assert (backwards[0], calls[0]) == (3, 3)


def test_interruption_between_method_calls_of_jobs(explainer: Explainer) -> None:
    """Forward-only jobs: the check before each method call stops the next job's call."""
    first, first_calls = _counting("cam")
    second, second_calls = _counting("rollout")
    with pytest.raises(Interrupted):
        explainer.explain_batch([first, second], interrupted=lambda: first_calls[0] >= 3)
    assert (first_calls[0], second_calls[0]) == (3, 0)  # cam: one call per explained class


@pytest.mark.parametrize(
    ("options", "passes"),
    [({"mode": "smoothgrad", "samples": 6}, 3), ({"mode": "integrated_gradients", "steps": 5}, 3)],
)
def test_interruption_stops_saliency_within_one_pass(options: dict, passes: int) -> None:
    """SmoothGrad samples / IG steps of the batch run two copies (4 images, max_pass_rows) to
    an input-gradient pass, the last pass taking the rest; interrupted after the second pass,
    no third runs."""
    explainer = Explainer(tiny_loaded(seed=4, dtype=torch.float64), max_pass_rows=4)
    job = _job("saliency", options, TargetSpec(), 2, seed=3)
    forwards: list[int] = []
    hook = explainer.model.module.register_forward_hook(
        lambda _m, inputs, _o: forwards.append(inputs[0].shape[0])
    )
    try:
        with pytest.raises(Interrupted):
            explainer.explain_batch([job], interrupted=lambda: len(forwards) >= 1 + 2)
        assert forwards == [2, 4, 4]  # the recording's forward, then two passes of two copies
        forwards.clear()
        explainer.explain_batch([job])
        assert len(forwards) == 1 + passes
        assert sum(forwards[1:]) == 2 * options.get("samples", options.get("steps"))
    finally:
        hook.remove()
        explainer.close()


def test_out_of_memory_splits_the_batch_and_a_poisoned_request_fails_alone() -> None:
    calls: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        calls.append(items)
        if len(items) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        if "poison" in items:
            raise RuntimeError("NaN everywhere")
        return [f"ok {i}" for i in items]

    results = _isolated(run, ["a", "b", "poison", "c", "d"])
    assert results[:2] == ["ok a", "ok b"] and results[3:] == ["ok c", "ok d"]
    assert isinstance(results[2], RuntimeError)
    assert calls[0] == ["a", "b", "poison", "c", "d"] and ["poison"] in calls

    def always_oom(items: list[str]) -> list[str]:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    (alone,) = _isolated(always_oom, ["huge"])
    assert isinstance(alone, ResourceExhausted) and "fewer images" in str(alone)

    def cpu_allocator_fails(items: list[str]) -> list[str]:  # the CPU allocator's own message
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: not enough memory: "
            "you tried to allocate 85899345920 bytes. Error code 12 (Cannot allocate memory)"
        )

    (alone,) = _isolated(cpu_allocator_fails, ["huge"])
    assert isinstance(alone, ResourceExhausted)


def test_predict_batches_keep_each_requests_top_k(explainer: Explainer) -> None:
    jobs = [PredictJob(torch.rand(2, 3, 32, 32), 1), PredictJob(torch.rand(3, 3, 32, 32), 4)]
    results = _predict_batch(explainer, jobs)
    for job, result in zip(jobs, results, strict=True):
        alone = explainer.predict(job.pixels, job.top_k)
        assert result.indices.shape == (job.pixels.shape[0], job.top_k)
        np.testing.assert_array_equal(result.indices, alone.indices)
        np.testing.assert_allclose(result.probabilities, alone.probabilities, rtol=1e-9)


@pytest.mark.parametrize(
    "method", [s.name for s in METHODS.specs() if not s.needs_mask and s.name != "random"]
)
def test_bf16_autocast_runs_every_method_close_to_fp32(method: str) -> None:
    fp32 = tiny_loaded(seed=4)
    bf16 = dataclasses.replace(fp32, spec=dataclasses.replace(fp32.spec, precision="bf16"))
    job = _job(method, {}, TargetSpec(), 2, seed=9)
    reference = Explainer(fp32).explain(job)
    result = Explainer(bf16).explain(job)
    assert result.heatmaps.dtype == np.float32 and np.isfinite(result.heatmaps).all()
    np.testing.assert_array_equal(result.targets, reference.targets)
    if method == "token_reflection":
        # Its map compares the logits of gh·gw nearly identical masked images; on this random
        # tiny model they differ by less than bf16's resolution, so only finiteness is checked
        # (scripts/bench_precision.py measures the difference on the demo model).
        return
    flat, ref = result.heatmaps.reshape(2, -1), reference.heatmaps.reshape(2, -1)
    for a, b in zip(flat, ref, strict=True):
        if np.ptp(b) > 0:
            assert np.corrcoef(a, b)[0, 1] > 0.9, method
