"""The Evaluate runner in process: every metric for several methods, progress, cancellation."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tests.tiny import tiny_loaded
from vitlens_server.errors import InvalidArgument
from vitlens_server.evaluate.datasets import SyntheticDataset
from vitlens_server.evaluate.runner import METRICS, Cancelled, EvaluationPlan, run_evaluation
from vitlens_server.explain import Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.engine import resize_maps
from vitlens_server.explain.params import parse_params

SIZE = (32, 32)
GRID = (4, 4)  # tiny_loaded: 8 px patches
GEOMETRY = {"input_size": SIZE, "grid": GRID, "num_classes": 8}


class InProcess:
    """`ModelCalls` straight on an Explainer (the server routes them through its batcher)."""

    def __init__(self, randomised_seed: int = 99) -> None:
        self.explainer = Explainer(tiny_loaded(seed=6, num_classes=8))
        self.randomised = Explainer(tiny_loaded(seed=randomised_seed, num_classes=8))

    def explain(self, job):
        return self.explainer.explain(job)

    def randomised_explain(self, job):
        return self.randomised.explain(job)

    def logits(self, pixels):
        return self.explainer.logits(pixels)


@pytest.fixture(scope="module")
def calls() -> InProcess:
    return InProcess()


def test_every_metric_for_reference_and_real_methods(calls) -> None:
    plan = EvaluationPlan(
        methods=("oracle", "random", "generic", "rollout"),
        metrics=tuple(m for m in METRICS if m != "class_sensitivity"),
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
        (m, k) for m in plan.methods for k in plan.metrics
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
    import vitlens_server.evaluate.runner as runner

    seen = []
    real = runner.perturbation_curve

    def spy(*args, **kwargs):
        seen.append((kwargs["positive"], kwargs["baseline"], kwargs["batch_size"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "perturbation_curve", spy)
    plan = EvaluationPlan(
        methods=("oracle",),
        metrics=("perturbation", "average_drop"),
        metric_options={"perturbation": {"baseline": "inpaint"}},
    )
    run_evaluation(plan, SyntheticDataset(2), calls, **GEOMETRY)
    assert seen == [(True, "inpaint", 64), (False, "inpaint", 64)]
    bad = EvaluationPlan(methods=("oracle",), metrics=("average_drop",),
                         metric_options={"average_drop": {"keep": 1.5}})  # fmt: skip
    with pytest.raises(InvalidArgument, match=r"average_drop.keep must lie in \[0.0, 1.0\]"):
        run_evaluation(bad, SyntheticDataset(2), calls, **GEOMETRY)


def test_class_sensitivity_on_two_object_scenes(calls) -> None:
    plan = EvaluationPlan(methods=("oracle", "generic"), metrics=("class_sensitivity",))
    results = run_evaluation(plan, SyntheticDataset(3, two_object=True), calls, **GEOMETRY)
    oracle, generic = (r.values["difference"] for r in results)
    assert oracle.n == generic.n == 6 and oracle.mean == pytest.approx(1.0)
    assert -1 <= generic.mean <= 1


def test_sanity_compares_with_the_randomised_copy(calls) -> None:
    plan = EvaluationPlan(methods=("oracle", "generic", "rollout"), metrics=("sanity",))

    def run(c):
        results = run_evaluation(plan, SyntheticDataset(4), c, **GEOMETRY)
        return {r.method: r.values["spearman"] for r in results}

    other = run(calls)
    same = run(InProcess(randomised_seed=6))  # the "randomised" copy is the model itself
    assert other["oracle"].mean == pytest.approx(1.0) and other["oracle"].n == 4
    assert same["generic"].mean == pytest.approx(1.0) and same["rollout"].mean == pytest.approx(1.0)
    assert other["generic"].mean < 0.9 and other["rollout"].mean < 0.9


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
    plan = EvaluationPlan(methods=("rollout",), metrics=("segmentation",), chunk_size=1)
    with pytest.raises(Cancelled):
        run_evaluation(
            plan, SyntheticDataset(4), calls, **GEOMETRY,
            progress=lambda _: cancelled.set(), cancelled=cancelled,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (EvaluationPlan(("generic",), ("nope",)), "unknown metrics"),
        (EvaluationPlan(("nope",), ("segmentation",)), "unknown method"),
        (EvaluationPlan(("generic",), ("class_sensitivity",)), "two-object"),
    ],
)
def test_bad_plans_are_invalid_arguments(calls, plan, message) -> None:
    with pytest.raises(InvalidArgument, match=message):
        run_evaluation(plan, SyntheticDataset(2), calls, **GEOMETRY)
