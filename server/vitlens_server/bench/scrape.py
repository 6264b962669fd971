"""Read a Prometheus histogram from a metrics endpoint and difference two scrapes.

A benchmark scrapes ``/metrics`` before and after its timed window; the difference of the
cumulative ``_bucket``/``_sum``/``_count`` series is the histogram of that window alone. Batch
sizes are whole numbers, so a bucket ``(lo, hi]`` holds the sizes ``floor(lo) + 1 .. floor(hi)``.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "BatchSizeDistribution",
    "HistogramSnapshot",
    "ScrapeError",
    "batch_size_distribution",
    "fetch_metrics",
    "parse_histogram",
]

BATCH_SIZE_METRIC = "vitlens_batch_size"
QUEUE_WAIT_METRIC = "vitlens_queue_wait_seconds"


class ScrapeError(RuntimeError):
    """The metrics endpoint did not answer, or answered without the expected series."""


@dataclass(frozen=True)
class HistogramSnapshot:
    """One histogram, summed over every series whose labels match the selection.

    Attributes:
        buckets: ``(le, cumulative count)`` in ascending ``le``; the last ``le`` is ``inf``.
        sum: sum of the observed values.
        count: number of observations.
    """

    buckets: tuple[tuple[float, float], ...]
    sum: float
    count: float

    def __sub__(self, before: HistogramSnapshot) -> HistogramSnapshot:
        """The observations made between ``before`` and this snapshot.

        Raises:
            ScrapeError: the bucket bounds differ or a counter went down (a server restart).
        """
        if [le for le, _ in self.buckets] != [le for le, _ in before.buckets]:
            raise ScrapeError("histogram buckets changed between the two scrapes")
        pairs = zip(self.buckets, before.buckets, strict=True)
        diff = tuple((le, a - b) for (le, a), (_, b) in pairs)
        if self.count < before.count or any(c < 0 for _, c in diff):
            raise ScrapeError("histogram counters went down between scrapes (server restarted?)")
        return HistogramSnapshot(diff, self.sum - before.sum, self.count - before.count)

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan


@dataclass(frozen=True)
class BatchSizeDistribution:
    """Model passes of a timed window by batch size.

    Attributes:
        passes: ``(label, count)`` per bucket, e.g. ``("1", 3)``, ``("3-4", 10)``, ``(">32", 0)``.
        total_passes: number of model passes.
        mean: images per pass (``_sum / _count`` of the window).
    """

    passes: tuple[tuple[str, int], ...]
    total_passes: int
    mean: float

    def compact(self) -> str:
        """Non-empty buckets as ``label:count`` pairs, e.g. ``"1:3 5-8:12"``."""
        return " ".join(f"{label}:{n}" for label, n in self.passes if n) or "-"


def fetch_metrics(url: str, timeout_s: float = 5.0) -> str:
    """GET the Prometheus text at ``url``.

    Raises:
        ScrapeError: connection refused, timeout, HTTP error, or a non-text body.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read().decode("utf-8")
    except (OSError, urllib.error.URLError, UnicodeDecodeError) as err:
        raise ScrapeError(f"cannot read metrics from {url}: {err}") from err


def parse_histogram(
    text: str, name: str, labels: Mapping[str, str] | None = None
) -> HistogramSnapshot:
    """The histogram ``name`` in Prometheus text, summed over series matching ``labels``.

    Series with other labels besides ``labels`` (e.g. a method label) are added up bucket by
    bucket, so ``labels={"model": "m"}`` gives model ``m``'s histogram over everything else.

    Raises:
        ScrapeError: no series of ``name`` matches.
    """
    wanted = dict(labels or {})
    buckets: dict[float, float] = {}
    totals = {"sum": 0.0, "count": 0.0}
    found = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if any(sample.labels.get(k) != v for k, v in wanted.items()):
                continue
            if sample.name == f"{name}_bucket":
                le = float(sample.labels["le"])  # "+Inf" parses to inf
                buckets[le] = buckets.get(le, 0.0) + sample.value
                found = True
            elif sample.name in (f"{name}_sum", f"{name}_count"):
                totals[sample.name.rsplit("_", 1)[1]] += sample.value
    if not found:
        where = f" with labels {wanted}" if wanted else ""
        raise ScrapeError(f"no histogram {name!r}{where} in the metrics")
    return HistogramSnapshot(tuple(sorted(buckets.items())), totals["sum"], totals["count"])


def _bucket_label(low: float, high: float) -> str:
    """Integer sizes in ``(low, high]``: ``"1"``, ``"3-4"``, ``">32"``."""
    first = math.floor(low) + 1 if math.isfinite(low) else 1
    if math.isinf(high):
        return f">{math.floor(low)}"
    last = math.floor(high)
    return str(last) if first >= last else f"{first}-{last}"


def batch_size_distribution(window: HistogramSnapshot) -> BatchSizeDistribution:
    """Per-bucket pass counts of a window's batch-size histogram (cumulative → per bucket)."""
    passes = []
    previous_le, previous_count = -math.inf, 0.0
    for le, cumulative in window.buckets:
        count = round(cumulative - previous_count)
        if count or math.isfinite(le):  # an empty +Inf bucket adds nothing worth printing
            passes.append((_bucket_label(max(previous_le, 0.0), le), count))
        previous_le, previous_count = le, cumulative
    return BatchSizeDistribution(tuple(passes), round(window.count), window.mean)
