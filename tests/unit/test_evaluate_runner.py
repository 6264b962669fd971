"""The Evaluate runner in process: the plan, the metric registry, every metric for several
methods, progress, cancellation."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

import vitlens_server.evaluate.faithfulness as faithfulness
import vitlens_server.evaluate.plan as plan_module
from tests.tiny import tiny_loaded
from vitlens_server.errors import InvalidArgument
from vitlens_server.evaluate import (
    METRICS,
    Cancelled,
    LocalCalls,
    Sample,
    Scores,
    SyntheticDataset,
    plan_evaluation,
    register_metric,
    run_evaluation,
)
from vitlens_server.evaluate.registry import MetricRegistry
from vitlens_server.explain import Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.engine import resize_maps
from vitlens_server.explain.params import NoParams, parse_params

SIZE = (32, 32)
GRID = (4, 4)  # tiny_loaded: 8 px patches
GEOMETRY = {"input_size": SIZE, "grid": GRID, "num_classes": 8}


def _calls(randomised_seed: int = 99) -> LocalCalls:
    return LocalCalls(
        Explainer(tiny_loaded(seed=6, num_classes=8)),
        Explainer(tiny_loaded(seed=randomised_seed, num_classes=8)),
    )


@pytest.fixture(scope="module")
def calls() -> LocalCalls:
    return _calls()


def test_every_metric_for_reference_and_real_methods(calls) -> None:
    plan = plan_evaluation(
        ("oracle", "random", "generic", "rollout"),
        tuple(m for m in METRICS if m != "class_sensitivity"),
        metric_options={"deletion": {"steps": 4}, "insertion": {"steps": 4}},
        chunk_size=3,
    )
    events = []
    results = run_evaluation(
        plan,
        SyntheticDataset(5),
        calls,
        input_size=SIZE,
        grid=GRID,
        num_classes=8,
        progress=events.append,
    )
    assert [(r.method, r.metric) for r in results] == [
        (m.name, k.name) for m in plan.methods for k in plan.metrics
    ]
    for result in results:
        assert result.values and all(s.n == 5 for s in result.values.values())
        assert all(np.isfinite(s.mean) for s in result.values.values())
    by = {(r.method, r.metric): r for r in results}
    oracle = by[("oracle", "segmentation")].values
    assert oracle["iou"].mean == pytest.approx(1.0) and oracle["f1"].mean == pytest.approx(1.0)
    x, y = by[("generic", "perturbation")].curves["positive"]
    assert x[0] == 0 and len(x) == len(y) == 10
    assert len(by[("rollout", "deletion")].curves["probability"][1]) == 5
    assert [e.done for e in events] == [3, 6, 9, 12, 14, 16, 18, 20]
    assert events[-1].total == 20 and events[-1].eta_seconds == 0


def test_metric_options_reach_the_metrics_with_defaults_filled_in(calls, monkeypatch) -> None:
    seen = []
    real = faithfulness.perturbation_curve

    def spy(*args, **kwargs):
        seen.append((kwargs["positive"], kwargs["baseline"], kwargs["batch_size"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(faithfulness, "perturbation_curve", spy)
    plan = plan_evaluation(
        ("oracle",),
        ("perturbation", "average_drop"),
        metric_options={"perturbation": {"baseline": "inpaint"}},
    )
    run_evaluation(plan, SyntheticDataset(2), calls, **GEOMETRY)
    assert seen == [(True, "inpaint", 64), (False, "inpaint", 64)]
    with pytest.raises(InvalidArgument, match=r"average_drop.keep must lie in \[0.0, 1.0\]"):
        plan_evaluation(("oracle",), ("average_drop",), {}, {"average_drop": {"keep": 1.5}})


def test_the_plan_parses_once(calls, monkeypatch) -> None:
    plan = plan_evaluation(
        ["rollout", "oracle"],
        ["segmentation", "deletion"],
        method_options={"rollout": {"head_fusion": "max"}},
        metric_options={"deletion": {"steps": 2}},
        explain_label=True,
    )
    rollout, oracle = plan.methods
    assert rollout.name == "rollout" and rollout.spec is get_method("rollout")
    assert rollout.params.head_fusion == "max" and rollout.params.discard_ratio == 0.0
    assert isinstance(oracle.params, NoParams) and oracle.spec.needs_mask
    assert [m.options for m in plan.metrics][1].steps == 2 and plan.explain_label
    assert not plan.needs_randomised and plan_evaluation(["rollout"], ["sanity"]).needs_randomised
    assert not plan_evaluation(["oracle"], ["sanity"]).needs_randomised  # reads only the mask

    def no_parsing(*args, **kwargs):
        raise AssertionError("the run parsed options again")

    monkeypatch.setattr(plan_module, "parse_params", no_parsing)
    results = run_evaluation(plan, SyntheticDataset(2), calls, **GEOMETRY)
    assert len(results[1].curves["probability"][0]) == 3  # steps=2: 3 points


@pytest.mark.parametrize(
    ("request_args", "message"),
    [
        ((["generic"], ["nope"]), "unknown metrics"),
        ((["nope"], ["segmentation"]), "unknown method"),
        ((["generic"], []), "name at least one method and one metric"),
        ((["generic", "generic"], ["sanity"]), r"methods \['generic'\] are named more than once"),
        (
            (["generic"], ["deletion"], {}, {"deletion": {"stpes": 4}}),
            "metric 'deletion' has no option 'stpes'; valid: steps, baseline, batch_size",
        ),
        (
            (["generic"], ["insertion"], {}, {"insertion": {"baseline": "inpaint"}}),
            "insertion.baseline must be one of zeros, blur",
        ),
        (
            (["generic"], ["segmentation"], {}, {"perturbaton": {"baseline": "inpaint"}}),
            r"unknown metrics \['perturbaton'\]",
        ),
        (
            (["generic"], ["segmentation"], {"rolout": {}}),
            r"method_options name unknown methods \['rolout'\]",
        ),
        (
            (["rollout"], ["segmentation"], {"rollout": {"head_fusion": "median"}}),
            "rollout.head_fusion must be one of mean, max, min",
        ),
    ],
)
def test_bad_requests_are_invalid_arguments(request_args, message) -> None:
    with pytest.raises(InvalidArgument, match=message):
        plan_evaluation(*request_args)


@pytest.mark.parametrize("metric", list(METRICS))
def test_every_registered_metric_names_its_options(metric) -> None:
    spec = METRICS.get(metric)
    (planned,) = plan_evaluation(["random"], [metric]).metrics
    assert planned.spec is spec and planned.options == spec.options()
    valid = ", ".join(f.name for f in dataclasses.fields(spec.options)) or "none"
    with pytest.raises(
        InvalidArgument, match=f"metric '{metric}' has no option 'x'; valid: {valid}"
    ):
        plan_evaluation(["random"], [metric], {}, {metric: {"x": 1}})


def test_a_metric_name_is_registered_once() -> None:
    registry = MetricRegistry()

    def metric(ctx, options) -> Scores:
        return Scores({})

    register_metric("m", description="", registry=registry)(metric)
    with pytest.raises(ValueError, match="registered twice"):
        register_metric("m", description="", registry=registry)(metric)
    with pytest.raises(ValueError, match="'segmentation' is registered twice"):
        register_metric("segmentation", description="")(metric)
    assert list(registry) == ["m"] and METRICS.get("segmentation").fn is not metric


class NoModel:
    """`ModelCalls` that must not be called: the plan refuses the dataset first."""

    def explain(self, job):
        raise AssertionError("a model call before the dataset was checked")

    logits = randomised_explain = explain


def _samples(count: int, masks: bool, seed: int = 0, float_images: bool = False) -> list[Sample]:
    """Random 32 x 32 images (no resizing: uint8 and float images give equal pixels)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        image = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
        mask = np.zeros((1, *SIZE), bool)
        mask[0, 4 + i : 20 + i, 8:24] = True
        pixels = image.astype(np.float32) / 255 if float_images else image
        samples.append(Sample(f"s{i}", pixels, (i % 8,), mask if masks else None))
    return samples


@pytest.mark.parametrize(
    ("methods", "metrics", "message"),
    [
        (["generic"], ["segmentation"], "masks are needed by segmentation"),
        (["oracle"], ["perturbation"], "masks are needed by oracle"),
        (["generic"], ["class_sensitivity"], "masks are needed by class_sensitivity"),
    ],
)
def test_declared_needs_are_checked_before_any_model_call(methods, metrics, message) -> None:
    plan = plan_evaluation(methods, metrics)
    with pytest.raises(InvalidArgument, match=message):
        run_evaluation(plan, _samples(2, masks=False), NoModel(), **GEOMETRY)


def test_two_object_metrics_refuse_single_objects() -> None:
    plan = plan_evaluation(["generic"], ["class_sensitivity"])
    with pytest.raises(InvalidArgument, match=r"two-object samples \(synthetic:N\[:seed\]:two"):
        run_evaluation(plan, _samples(2, masks=True), NoModel(), **GEOMETRY)
    with pytest.raises(InvalidArgument, match="labels"):
        run_evaluation(plan_evaluation(["generic"], ["sanity"]), _samples(9, True), NoModel(),
                       **{**GEOMETRY, "num_classes": 4})  # fmt: skip
    with pytest.raises(InvalidArgument, match="empty"):
        run_evaluation(plan, [], NoModel(), **GEOMETRY)


def test_float_images_score_as_their_uint8_originals(calls) -> None:
    plan = plan_evaluation(
        ["generic", "oracle"], ["segmentation", "deletion"], {}, {"deletion": {"steps": 3}}
    )
    uint8, floats = (
        run_evaluation(plan, _samples(3, True, float_images=f), calls, **GEOMETRY)
        for f in (False, True)
    )
    assert uint8 == floats


def test_class_sensitivity_on_two_object_scenes(calls) -> None:
    plan = plan_evaluation(("oracle", "generic", "rollout"), ("class_sensitivity",))
    results = run_evaluation(plan, SyntheticDataset(3, two_object=True), calls, **GEOMETRY)
    oracle, generic, rollout = (r.values for r in results)
    assert oracle["difference"].n == generic["difference"].n == 6
    assert oracle["difference"].mean == pytest.approx(1.0) and -1 <= generic["difference"].mean <= 1
    assert oracle["explained"].mean == pytest.approx(1.0) and oracle["other"].mean == 0
    assert generic["between_classes"].n == 3 and generic["between_classes"].mean < 1
    # A class-agnostic method's map is one map for both classes: exactly 0, correlation 1.
    assert rollout["difference"].mean == pytest.approx(0, abs=1e-12) and rollout[
        "between_classes"
    ].mean == pytest.approx(1)
    for values in (oracle, generic, rollout):
        assert values["difference"].mean == pytest.approx(
            values["explained"].mean - values["other"].mean
        )
    # Explaining the label reuses the chunk's maps for the first object: the same numbers.
    labelled = dataclasses.replace(plan, explain_label=True)
    assert run_evaluation(labelled, SyntheticDataset(3, two_object=True), calls, **GEOMETRY) == (
        results
    )


def test_sanity_compares_with_the_randomised_copy(calls) -> None:
    plan = plan_evaluation(("oracle", "generic", "rollout"), ("sanity",))

    def run(c):
        results = run_evaluation(plan, SyntheticDataset(4), c, **GEOMETRY)
        return {r.method: r.values["spearman"] for r in results}

    other = run(calls)
    same = run(_calls(randomised_seed=6))  # the "randomised" copy is the model itself
    assert other["oracle"].mean == pytest.approx(1.0) and other["oracle"].n == 4
    assert same["generic"].mean == pytest.approx(1.0) and same["rollout"].mean == pytest.approx(1.0)
    assert other["generic"].mean < 0.9 and other["rollout"].mean < 0.9
    without = LocalCalls(calls.explainer)
    with pytest.raises(ValueError, match="no randomised model"):
        run_evaluation(plan_evaluation(["generic"], ["sanity"]), SyntheticDataset(1), without,
                       **GEOMETRY)  # fmt: skip


@pytest.mark.parametrize("method", ["saliency", "generic"])  # a pixel map, a token map
def test_native_maps_resize_to_what_either_grid_returns(calls, method) -> None:
    """The runner explains once at the method's own resolution and resizes for each metric."""
    spec = get_method(method)
    params = parse_params(spec.params, {}, method=method)
    pixels = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    maps = {
        grid: calls.explain(ExplainJob(pixels, spec, params, TargetSpec(), grid=grid)).heatmaps
        for grid in ("native", "input", "tokens")
    }
    native = torch.from_numpy(maps["native"])
    for grid, size in (("input", SIZE), ("tokens", GRID)):
        assert torch.equal(resize_maps(native, size), torch.from_numpy(maps[grid]))


def test_cancellation_stops_between_steps(calls) -> None:
    cancelled = threading.Event()
    plan = plan_evaluation(("rollout",), ("segmentation",), chunk_size=1)
    with pytest.raises(Cancelled):
        run_evaluation(
            plan, SyntheticDataset(4), calls, **GEOMETRY,
            progress=lambda _: cancelled.set(), cancelled=cancelled,
        )  # fmt: skip
