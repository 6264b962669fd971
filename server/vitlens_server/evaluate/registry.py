"""The registry of Evaluate's metrics: one table of names, options, needs and functions.

A metric is one function ``(MetricContext, options) -> Scores``: it reads one chunk of samples
explained by one method (`context.MetricContext`) and returns per-image values and curves. Its
`MetricSpec` declares the options dataclass (parsed once per request by `plan_evaluation`) and
what the samples must carry (masks, two objects), which the plan checks before any model call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from vitlens_server.errors import InvalidArgument
from vitlens_server.explain.params import NoParams

if TYPE_CHECKING:
    from vitlens_server.evaluate.context import MetricContext

__all__ = [
    "METRICS",
    "Curve",
    "MetricFn",
    "MetricRegistry",
    "MetricSpec",
    "Scores",
    "get_metric",
    "register_metric",
]


@dataclass(frozen=True)
class Curve:
    """One curve per image: ``y`` (n, S) sampled at ``x`` (S,); reported as the mean curve."""

    x: tuple[float, ...]
    y: Tensor


@dataclass(frozen=True)
class Scores:
    """A metric's result on one chunk of B samples.

    Attributes:
        values: name → (n,) per-image values; n = B, or a multiple of B for a metric that scores
            each object of a sample (``class_sensitivity``: 2B). Every value is summarised
            (mean, std, 95 % CI, n) over the whole dataset.
        curves: name → `Curve` with y (B, S).
    """

    values: dict[str, Tensor]
    curves: dict[str, Curve] = field(default_factory=dict)


MetricFn = Callable[["MetricContext", Any], Scores]


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric.

    Attributes:
        name: the request's name for it.
        fn: ``(MetricContext, options) -> Scores``.
        options: frozen dataclass of its options (`explain.params.param` / `choice` fields).
        description: one line for documentation.
        needs_masks: the samples must carry ground-truth masks.
        needs_two_objects: the samples must have (at least) two labelled objects.
        needs_randomised: it calls ``ModelCalls.randomised_explain`` (a weight-randomised copy
            of the model), for methods that read the model.
    """

    name: str
    fn: MetricFn
    options: type
    description: str
    needs_masks: bool = False
    needs_two_objects: bool = False
    needs_randomised: bool = False


class MetricRegistry:
    """Name → spec, iterated by name; registering a name twice is an error."""

    def __init__(self) -> None:
        self._specs: dict[str, MetricSpec] = {}

    def add(self, spec: MetricSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"metric {spec.name!r} is registered twice")
        self._specs[spec.name] = spec

    def get(self, name: str) -> MetricSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise InvalidArgument(f"unknown metrics {[name]}; valid metrics: {', '.join(self)}")
        return spec

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._specs))

    def __len__(self) -> int:
        return len(self._specs)

    def specs(self) -> list[MetricSpec]:
        return [self._specs[name] for name in self]


METRICS = MetricRegistry()


def register_metric(
    name: str,
    *,
    description: str,
    options: type = NoParams,
    needs_masks: bool = False,
    needs_two_objects: bool = False,
    needs_randomised: bool = False,
    registry: MetricRegistry = METRICS,
) -> Callable[[MetricFn], MetricFn]:
    """Decorator adding a metric function to ``registry`` (`METRICS`)."""

    def add(fn: MetricFn) -> MetricFn:
        registry.add(
            MetricSpec(
                name=name,
                fn=fn,
                options=options,
                description=description,
                needs_masks=needs_masks,
                needs_two_objects=needs_two_objects,
                needs_randomised=needs_randomised,
            )
        )
        return fn

    return add


def get_metric(name: str) -> MetricSpec:
    return METRICS.get(name)
