"""What a load run measured: per-client samples, their latency summary and the run's report.

Definitions (`summarize`): throughput is completed work over the window from the first send to
the last answer; latency percentiles are over successful requests, by linear interpolation
between order statistics.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vitlens_server.bench.scrape import BatchSizeDistribution

if TYPE_CHECKING:
    from vitlens_server.bench.load import LoadConfig

__all__ = ["LatencySummary", "LoadReport", "Samples", "summarize"]


@dataclass
class Samples:
    """Raw outcome of one client's timed window (monotonic clock seconds)."""

    latencies_s: list[float] = field(default_factory=list)
    images: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    queue_s: list[float] = field(default_factory=list)  # server-reported, per request
    compute_s: list[float] = field(default_factory=list)
    started: float = float("inf")
    finished: float = float("-inf")

    def merge(self, other: Samples) -> Samples:
        return Samples(
            self.latencies_s + other.latencies_s,
            self.images + other.images,
            self.errors + other.errors,
            self.queue_s + other.queue_s,
            self.compute_s + other.compute_s,
            min(self.started, other.started),
            max(self.finished, other.finished),
        )


@dataclass(frozen=True)
class LatencySummary:
    """Seconds per successful request."""

    p50_s: float
    p90_s: float
    p99_s: float
    mean_s: float
    max_s: float

    @staticmethod
    def of(latencies_s: Sequence[float]) -> LatencySummary:
        """Percentiles by linear interpolation between order statistics (numpy's default)."""
        if not latencies_s:
            return LatencySummary(*(float("nan"),) * 5)
        a = np.asarray(latencies_s, dtype=np.float64)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return LatencySummary(float(p50), float(p90), float(p99), float(a.mean()), float(a.max()))


@dataclass(frozen=True)
class LoadReport:
    """What one run measured; see the module docstring for the definitions."""

    model: str
    method: str
    concurrency: int
    images_per_request: int
    processes: int
    requests_ok: int
    requests_failed: int
    errors: dict[str, int]
    images_ok: int
    window_s: float
    images_per_s: float
    requests_per_s: float
    latency: LatencySummary
    server_queue_mean_s: float
    server_compute_mean_s: float
    batch_sizes: BatchSizeDistribution | None
    queue_wait_mean_s: float | None
    metrics_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(
    samples: Samples,
    config: LoadConfig,
    model: str,
    *,
    batch_sizes: BatchSizeDistribution | None = None,
    queue_wait_mean_s: float | None = None,
    metrics_note: str = "",
) -> LoadReport:
    """Throughput and latency of a window: images/s = successful images / (last answer − first
    send), and the latency percentiles of the successful requests."""
    ok = len(samples.latencies_s)
    window = max(samples.finished - samples.started, 0.0) if ok or samples.errors else 0.0
    rate = (lambda n: n / window) if window > 0 else (lambda n: 0.0)
    return LoadReport(
        model=model,
        method=config.method,
        concurrency=config.concurrency,
        images_per_request=config.images_per_request,
        processes=config.processes,
        requests_ok=ok,
        requests_failed=sum(samples.errors.values()),
        errors=dict(sorted(samples.errors.items())),
        images_ok=samples.images,
        window_s=window,
        images_per_s=rate(samples.images),
        requests_per_s=rate(ok),
        latency=LatencySummary.of(samples.latencies_s),
        server_queue_mean_s=float(np.mean(samples.queue_s)) if samples.queue_s else float("nan"),
        server_compute_mean_s=float(np.mean(samples.compute_s))
        if samples.compute_s
        else float("nan"),
        batch_sizes=batch_sizes,
        queue_wait_mean_s=queue_wait_mean_s,
        metrics_note=metrics_note,
    )
