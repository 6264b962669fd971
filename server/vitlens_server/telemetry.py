"""Prometheus metrics, served on their own HTTP port (``vitlens serve --metrics-port``).

Each server owns a `Telemetry` with its own registry, so several servers (tests) never share
counters. Names follow Prometheus conventions: base units, ``_total`` counters, ``_seconds``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from vitlens_server.runtime.batcher import BatchStats

__all__ = ["MemoryReader", "Telemetry"]

MemoryReader = Callable[[], tuple[int, int]]  # (allocated, reserved) bytes

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
QUEUE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
BATCH_BUCKETS = tuple(float(2**i) for i in range(11))  # 1 … 1024 images


class Telemetry:
    """The service's metrics: requests, latency, batching, queues, cache, device memory."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vitlens_requests", "RPCs by method and status code", ["rpc", "method", "code"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "vitlens_request_seconds", "RPC latency (received to answered)", ["rpc", "method"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "vitlens_in_flight_requests", "RPCs being handled", ["rpc"], registry=r
        )
        self.queue_wait = Histogram(
            "vitlens_queue_wait_seconds", "Time a request waited for its model pass",
            ["model"], buckets=QUEUE_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "vitlens_batch_size", "Images per model pass", ["model", "kind"],
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_requests = Histogram(
            "vitlens_batch_requests", "Requests (or request chunks) per model pass", ["model"],
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "vitlens_queue_depth_images", "Images waiting for a model pass", ["model"], registry=r
        )
        self.cache_hits = Counter(
            "vitlens_cache_hits", "Images answered from the result cache", ["model"], registry=r
        )
        self.cache_misses = Counter(
            "vitlens_cache_misses", "Images computed (not in the result cache)", ["model"],
            registry=r,
        )  # fmt: skip
        self._devices: dict[str, MemoryReader] = {}
        r.register(_DeviceMemory(self._devices))

    def watch_queue(self, model: str, depth: Callable[[], int]) -> None:
        """Report ``depth()`` as the model's queue depth at every scrape."""
        self.queue_depth.labels(model).set_function(depth)

    def watch_device(self, device: str, read: MemoryReader) -> None:
        """Report ``read()`` — (allocated, reserved) bytes — as the device's memory at every
        scrape."""
        self._devices[device] = read

    def on_cache(self, model: str, hits: int, misses: int) -> None:
        """Record one Explain request's cache lookups (the data plane's callback)."""
        self.cache_hits.labels(model).inc(hits)
        self.cache_misses.labels(model).inc(misses)

    def on_batch(self, model: str, stats: BatchStats) -> None:
        """Record one model pass (the batcher's callback)."""
        kind = _kind_label(stats.kind)
        self.batch_size.labels(model, kind).observe(stats.images)
        self.batch_requests.labels(model).observe(stats.requests)
        for wait_s in stats.queue_waits_s:
            self.queue_wait.labels(model).observe(wait_s)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` over HTTP on its own thread; returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        """Stop the HTTP endpoint, if serving."""
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
            self._http = None

    def text(self) -> str:
        """The exposition text (what ``/metrics`` answers)."""
        return generate_latest(self.registry).decode()


def _kind_label(kind: object) -> str:
    """("explain", Cost.BACKWARD) → "explain-backward"; ("predict",) → "predict"."""
    if isinstance(kind, tuple):
        return "-".join(getattr(part, "name", str(part)).lower() for part in kind)
    return str(kind)


class _DeviceMemory:
    """Collector of allocated and reserved device memory per watched device, read at scrape."""

    def __init__(self, devices: dict[str, MemoryReader]) -> None:
        self._devices = devices

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "vitlens_device_memory_bytes",
            "Device memory held by PyTorch",
            labels=["device", "kind"],
        )
        for device, read in self._devices.items():
            allocated, reserved = read()
            family.add_metric([device, "allocated"], allocated)
            family.add_metric([device, "reserved"], reserved)
        yield family
