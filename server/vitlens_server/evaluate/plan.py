"""An Evaluate request, parsed once: resolved methods with their parameters, resolved metrics with
their options, and the checks a dataset's samples must pass.

`plan_evaluation` raises `InvalidArgument` for every mistake a request can hold — unknown
methods, metrics or options, options of the wrong type or out of range — before a run starts;
the runner then never parses again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vitlens_server.errors import InvalidArgument, clip
from vitlens_server.evaluate.datasets import Sample
from vitlens_server.evaluate.registry import METRICS, MetricSpec
from vitlens_server.explain import METHODS, MethodSpec, get_method
from vitlens_server.explain.params import parse_params

__all__ = ["EvaluationPlan", "PlannedMethod", "PlannedMetric", "plan_evaluation", "plan_method"]

Options = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class PlannedMethod:
    """A method of the plan: its registered spec and its parsed parameters (``spec.params``)."""

    name: str
    spec: MethodSpec
    params: object


@dataclass(frozen=True)
class PlannedMetric:
    """A metric of the plan: its registered spec and its parsed options (``spec.options``)."""

    name: str
    spec: MetricSpec
    options: object


@dataclass(frozen=True)
class EvaluationPlan:
    """What to run: every method x every metric, samples in chunks of ``chunk_size``.

    ``explain_label``: explain each sample's label (``labels[0]``) instead of the prediction.
    Build it with `plan_evaluation`.
    """

    methods: tuple[PlannedMethod, ...]
    metrics: tuple[PlannedMetric, ...]
    explain_label: bool = False
    chunk_size: int = 32

    @property
    def needs_randomised(self) -> bool:
        """Whether the run will call ``ModelCalls.randomised_explain``: a metric needs the
        weight-randomised model and a method reads the model (not only the masks)."""
        return any(m.spec.needs_randomised for m in self.metrics) and any(
            not m.spec.needs_mask for m in self.methods
        )

    def check_sample(self, sample: Sample, num_classes: int) -> None:
        """Refuse a sample the plan cannot score: labels outside the model's ``num_classes``,
        no masks where a metric or a method needs them, one object where a metric needs two."""
        if not sample.labels or min(sample.labels) < 0 or max(sample.labels) >= num_classes:
            raise InvalidArgument(
                f"sample {sample.id!r} has labels {sample.labels}, not among the model's "
                f"{num_classes} classes (0..{num_classes - 1}): the dataset's labels must be "
                "the model's"
            )
        if sample.masks is None:
            needing = [m.name for m in self.metrics if m.spec.needs_masks]
            needing += [m.name for m in self.methods if m.spec.needs_mask]
            if needing:
                raise InvalidArgument(
                    f"ground-truth masks are needed by {', '.join(needing)}, and sample "
                    f"{sample.id!r} of this dataset has none"
                )
        if len(sample.labels) < 2:
            for metric in self.metrics:
                if metric.spec.needs_two_objects:
                    raise InvalidArgument(
                        f"{metric.name} needs two-object samples (synthetic:N[:seed]:two_object); "
                        f"sample {sample.id!r} has one object"
                    )


def plan_evaluation(
    methods: Sequence[str],
    metrics: Sequence[str],
    method_options: Options | None = None,
    metric_options: Options | None = None,
    explain_label: bool = False,
    *,
    chunk_size: int = 32,
) -> EvaluationPlan:
    """Validate a request and resolve it into an `EvaluationPlan`.

    ``method_options`` / ``metric_options``: name → that method's parameters / metric's options
    as request values (JSON-like); every one given is parsed, defaults fill the rest.
    Raises `InvalidArgument` for unknown or repeated names and for bad options.
    """
    method_options, metric_options = method_options or {}, metric_options or {}
    if not methods or not metrics:
        raise InvalidArgument(
            "name at least one method and one metric", field="methods" if not methods else "metrics"
        )
    _check_names("metrics", metrics, METRICS)
    _check_names("methods", methods, METHODS)
    for kind, given, requested, registry in (
        ("method_options", method_options, methods, METHODS),
        ("metric_options", metric_options, metrics, METRICS),
    ):
        what = kind.split("_")[0]
        unknown = [name for name in given if name not in registry]
        if unknown:
            raise InvalidArgument(
                f"{kind} name unknown {what}s {_names(unknown)}; valid: {', '.join(registry)}",
                field=kind,
            )
        stray = [name for name in given if name not in requested]
        if stray:
            raise InvalidArgument(
                f"{kind} names {_names(stray)}, which the request does not evaluate; give "
                f"options only for the {what}s named in {what}s",
                field=kind,
            )
    planned = {name: plan_method(name, method_options.get(name, {})) for name in methods}
    options = {
        name: parse_params(
            METRICS.get(name).options,
            metric_options.get(name, {}),
            method=name,
            kind="metric",
            field=f"metric_options[{name}]",
        )
        for name in metrics
    }
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    return EvaluationPlan(
        methods=tuple(planned[name] for name in methods),
        metrics=tuple(PlannedMetric(name, METRICS.get(name), options[name]) for name in metrics),
        explain_label=explain_label,
        chunk_size=chunk_size,
    )


def plan_method(name: str, options: Mapping[str, Any] | None = None) -> PlannedMethod:
    """One method resolved with its parameters parsed from ``options`` (defaults fill the rest);
    `InvalidArgument` for an unknown name or bad options."""
    spec = get_method(name)
    field = f"method_options[{name}]"
    return PlannedMethod(
        name, spec, parse_params(spec.params, options or {}, method=name, field=field)
    )


def _check_names(kind: str, names: Sequence[str], registry) -> None:
    """Every name registered, none repeated; else INVALID_ARGUMENT naming the field."""
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise InvalidArgument(
            f"unknown {kind} {_names(unknown)}; valid {kind}: {', '.join(registry)}", field=kind
        )
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise InvalidArgument(f"{kind} {_names(repeated)} are named more than once", field=kind)


def _names(names: Sequence[str]) -> str:
    """A few client-given names for a message, each clipped: ``['a', 'b', … 3 more]``."""
    shown = ", ".join(clip(n, 60) for n in names[:5])
    more = f", … {len(names) - 5} more" if len(names) > 5 else ""
    return f"[{shown}{more}]"
