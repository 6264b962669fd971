"""Evaluate results on the client: statistics, curves, a printable table, JSON.

`Client.evaluate` streams the server's progress events to a callback and returns an
`EvaluationResult` built from the result events.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vitlens.v1 import vitlens_pb2

__all__ = [
    "Curve",
    "EvaluationResult",
    "MetricResult",
    "Progress",
    "Statistic",
    "build_evaluate_request",
]


@dataclass(frozen=True)
class Progress:
    """Work done so far: ``done`` of ``total`` (images x methods), rate and time left."""

    done: int
    total: int
    images_per_second: float
    eta_seconds: float
    stage: str

    @classmethod
    def from_proto(cls, p: vitlens_pb2.Progress) -> Progress:
        return cls(p.done, p.total, p.images_per_second, p.eta_seconds, p.stage)


@dataclass(frozen=True)
class Statistic:
    """Mean, standard deviation, 95 % confidence interval of the mean, and n."""

    name: str
    mean: float
    std: float
    ci95_low: float
    ci95_high: float
    n: int


@dataclass(frozen=True)
class Curve:
    """A mean curve, e.g. accuracy at each perturbation step."""

    name: str
    x: tuple[float, ...]
    y: tuple[float, ...]


@dataclass(frozen=True)
class MetricResult:
    method: str
    metric: str
    values: tuple[Statistic, ...]
    curves: tuple[Curve, ...]

    @classmethod
    def from_proto(cls, r: vitlens_pb2.MetricResult) -> MetricResult:
        return cls(
            r.method,
            r.metric,
            tuple(Statistic(v.name, v.mean, v.std, v.ci95_low, v.ci95_high, v.n) for v in r.values),
            tuple(Curve(c.name, tuple(c.x), tuple(c.y)) for c in r.curves),
        )

    def value(self, name: str) -> Statistic:
        for statistic in self.values:
            if statistic.name == name:
                return statistic
        raise KeyError(f"{self.method}/{self.metric} has no value {name!r}")


@dataclass(frozen=True)
class EvaluationResult:
    """Every method x metric of one Evaluate call."""

    model: str
    dataset: str
    results: tuple[MetricResult, ...]

    def get(self, method: str, metric: str) -> MetricResult:
        for result in self.results:
            if (result.method, result.metric) == (method, metric):
                return result
        raise KeyError(f"no result for method {method!r} and metric {metric!r}")

    def table(self) -> str:
        """Methods as rows, ``metric.value`` as columns, mean ± CI half-width."""
        columns = list(
            dict.fromkeys(f"{r.metric}.{v.name}" for r in self.results for v in r.values)
        )
        methods = list(dict.fromkeys(r.method for r in self.results))
        cells = {
            (
                r.method,
                f"{r.metric}.{v.name}",
            ): f"{v.mean:.3f} ± {(v.ci95_high - v.ci95_low) / 2:.3f}"
            for r in self.results
            for v in r.values
        }
        rows = [["method", *columns]] + [
            [m, *(cells.get((m, c), "—") for c in columns)] for m in methods
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResult:
        """The inverse of ``json.loads(result.to_json())`` (e.g. a saved or merged result)."""
        return cls(
            data["model"],
            data["dataset"],
            tuple(
                MetricResult(
                    r["method"],
                    r["metric"],
                    tuple(Statistic(**v) for v in r["values"]),
                    tuple(Curve(c["name"], tuple(c["x"]), tuple(c["y"])) for c in r["curves"]),
                )
                for r in data["results"]
            ),
        )


def build_evaluate_request(
    *,
    methods: Sequence[str],
    metrics: Sequence[str],
    dataset: str,
    model: str = "",
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    explain_label: bool = False,
    limit: int = 0,
) -> vitlens_pb2.EvaluateRequest:
    """``dataset``: ``synthetic:N[:seed][:two_object]``, ``synthetic_vqa:N[:seed]`` (VQA
    models), ``synthetic_detection:N[:seed]`` (detectors) or an absolute folder on the
    server."""
    spec = vitlens_pb2.Dataset(limit=limit)
    if dataset.startswith(("synthetic:", "synthetic_vqa:", "synthetic_detection:")):
        spec.synthetic = dataset
    else:
        spec.server_path = dataset
    request = vitlens_pb2.EvaluateRequest(
        model=model,
        methods=list(methods),
        metrics=list(metrics),
        dataset=spec,
        explain_label=explain_label,
    )
    for name, options in (method_options or {}).items():
        request.method_options[name].update(dict(options))
    for name, options in (metric_options or {}).items():
        request.metric_options[name].update(dict(options))
    return request
