"""Closed-loop load on a running vitlens server through the SDK's `vitlens.AsyncClient`.

C workers each send one Explain request, await its answer and send the next, until N requests
were sent in all or T seconds passed (whichever comes first); requests in flight at the deadline
are awaited and counted. ``processes`` > 1 spreads the workers over that many client processes,
each with its own event loop and channel, so that a fast server is not limited by one Python
client; they draw from one shared request budget, and their windows are joined on the
system-wide monotonic clock (Linux ``CLOCK_MONOTONIC``).

Throughput is completed work over the window from the first send to the last answer:
images/s = Σ images of successful requests / window_s, requests/s likewise. Latency percentiles
are over successful requests and are what an SDK user sees: they include building the request
and decoding the answer. Every image sent is made unique (see `LoadConfig.unique_images`) so a
server-side result cache cannot stand in for computation. When a metrics URL answers, the
server's ``vitlens_batch_size`` histogram is scraped after the warm-up and after the window, and
the difference is the batch-size distribution of the window.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import secrets
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from vitlens import AsyncClient
from vitlens.errors import VitlensError
from vitlens.results import ModelInfo
from vitlens.v1 import tensor_pb2
from vitlens_server.bench.images import make_images, stamped
from vitlens_server.bench.scrape import (
    BATCH_SIZE_METRIC,
    QUEUE_WAIT_METRIC,
    BatchSizeDistribution,
    ScrapeError,
    batch_size_distribution,
    fetch_metrics,
    parse_histogram,
)
from vitlens_server.bench.stats import LatencySummary, LoadReport, Samples, summarize

__all__ = [
    "LatencySummary",
    "LoadConfig",
    "LoadReport",
    "Samples",
    "run_load",
    "summarize",
    "sweep",
]

_POOL_IMAGES = 16  # distinct images per run, cycled through the requests


@dataclass(frozen=True)
class LoadConfig:
    """One closed-loop run.

    Attributes:
        target: server address ``host:port``.
        model: served model name; "" is the server's default.
        method: explanation method.
        concurrency: closed-loop workers (C).
        requests: requests to send in all (N), warm-up excluded.
        duration_s: stop sending after this many seconds (T).
        images_per_request: images in each request (k).
        images: ``scenes`` (generated scenes) or ``random`` (uniform uint8 noise), at the
            model's input size.
        wire: how images travel: ``pixels`` (raw uint8 tensor) or ``png`` (encoded once here,
            decoded by the server).
        warmup_requests: untimed requests sent first at the same concurrency; None: one per
            worker.
        timeout_s: deadline of each request.
        processes: client processes the workers are spread over.
        method_options: options passed to the method.
        metrics_url: Prometheus endpoint of the server, for the batch-size distribution.
        seed: first scene seed / noise seed.
        unique_images: stamp every image sent with a 16-byte tag (random per client and run,
            then a counter) so that no two images carry the same bytes and a server-side result
            cache never answers; raw pixels get the tag in their first bytes (a few pixels of
            the top row), PNGs in a ``tEXt`` chunk.
    """

    target: str
    model: str = ""
    method: str = "generic"
    concurrency: int = 1
    requests: int = 200
    duration_s: float = 60.0
    images_per_request: int = 1
    images: Literal["scenes", "random"] = "scenes"
    wire: Literal["pixels", "png"] = "pixels"
    warmup_requests: int | None = None
    timeout_s: float = 120.0
    processes: int = 1
    method_options: Mapping[str, Any] = field(default_factory=dict)
    metrics_url: str | None = None
    seed: int = 0
    unique_images: bool = True


class _Budget:
    """Requests left to send, in this process."""

    def __init__(self, count: int) -> None:
        self.count = count

    def take(self) -> bool:
        if self.count <= 0:
            return False
        self.count -= 1
        return True


class _SharedBudget(_Budget):
    """Requests left to send, shared by the client processes (a locked shared integer)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def take(self) -> bool:
        with self.value.get_lock():
            if self.value.value <= 0:
                return False
            self.value.value -= 1
            return True


async def _drive(
    config: LoadConfig,
    model: str,
    images: Sequence[bytes],
    concurrency: int,
    budget: _Budget,
    warmup: int,
    between: Callable[[], Awaitable[None]],
) -> Samples:
    """One client: warm up, await ``between()``, then the timed closed loop until ``budget``
    runs out or ``config.duration_s`` passes."""
    pool = [tensor_pb2.Image.FromString(b) for b in images]
    k = config.images_per_request
    samples = Samples()
    sent = 0
    nonce = secrets.token_bytes(8)

    async with AsyncClient(config.target, timeout_s=config.timeout_s) as client:

        async def one(record: bool) -> None:
            nonlocal sent
            first = (sent * k) % len(pool)
            batch = [pool[(first + j) % len(pool)] for j in range(k)]
            if config.unique_images:
                batch = [
                    stamped(im, nonce + (sent * k + j).to_bytes(8, "little"))
                    for j, im in enumerate(batch)
                ]
            sent += 1
            start = time.monotonic()
            try:
                result = await client.explain(
                    batch, method=config.method, model=model, method_options=config.method_options
                )
            except VitlensError as err:
                if record:
                    samples.errors[err.code.name] += 1
                return
            except Exception as err:  # a client-side failure is counted, never fatal
                if record:
                    samples.errors[f"client:{type(err).__name__}"] += 1
                return
            finally:
                if record:
                    samples.finished = max(samples.finished, time.monotonic())
            if record:
                samples.latencies_s.append(time.monotonic() - start)
                samples.images += len(batch)
                samples.queue_s.append(result.timing.queue_seconds)
                samples.compute_s.append(result.timing.compute_seconds)

        async def worker(left: _Budget, deadline: float, record: bool) -> None:
            while time.monotonic() < deadline and left.take():
                await one(record)

        await client.wait_ready(timeout_s=config.timeout_s)
        if warmup:
            left, deadline = _Budget(warmup), time.monotonic() + config.timeout_s
            await asyncio.gather(*(worker(left, deadline, False) for _ in range(concurrency)))
        await between()
        samples.started = time.monotonic()
        deadline = samples.started + config.duration_s
        await asyncio.gather(*(worker(budget, deadline, True) for _ in range(concurrency)))
    return samples


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _child(
    config: LoadConfig,
    model: str,
    images: list[bytes],
    concurrency: int,
    requests: Any,
    warmup: int,
    barrier: Any,
    results: Any,
) -> None:
    """Entry of a spawned client process: sends its `Samples` (or its error) on ``results``."""

    async def between() -> None:
        await asyncio.to_thread(barrier.wait)  # every client warmed up: the parent scrapes
        await asyncio.to_thread(barrier.wait)  # the parent says go

    try:
        budget = _SharedBudget(requests)
        samples = asyncio.run(_drive(config, model, images, concurrency, budget, warmup, between))
        results.put(samples)
    except BaseException as err:
        barrier.abort()
        results.put(RuntimeError(f"client process failed: {type(err).__name__}: {err}"))


class _Histograms:
    """Before/after scrapes of the server's batch-size and queue-wait histograms."""

    def __init__(self, url: str | None, model: str) -> None:
        self.url, self.labels = url, {"model": model}
        self.before: tuple[Any, Any] | None = None
        self.note = "" if url else "no metrics URL given"

    def _read(self) -> tuple[Any, Any]:
        text = fetch_metrics(self.url)
        sizes = parse_histogram(text, BATCH_SIZE_METRIC, self.labels)
        try:
            wait = parse_histogram(text, QUEUE_WAIT_METRIC, self.labels)
        except ScrapeError:
            wait = None
        return sizes, wait

    async def start(self) -> None:
        if self.url:
            try:
                self.before = await asyncio.to_thread(self._read)
            except ScrapeError as err:
                self.note = str(err)

    async def finish(self) -> tuple[BatchSizeDistribution | None, float | None]:
        if self.before is None:
            return None, None
        try:
            sizes, wait = await asyncio.to_thread(self._read)
            window = sizes - self.before[0]
            wait_mean = None
            if wait is not None and self.before[1] is not None:
                wait_mean = (wait - self.before[1]).mean
        except ScrapeError as err:
            self.note = str(err)
            return None, None
        return batch_size_distribution(window), wait_mean


async def resolve_model(target: str, model: str, timeout_s: float = 30.0) -> ModelInfo:
    """The served model's `ModelInfo` ("" resolves to the default model)."""
    async with AsyncClient(target, timeout_s=timeout_s) as client:
        await client.wait_ready(timeout_s=timeout_s)
        return await client.model(model)


async def run_load(config: LoadConfig, info: ModelInfo | None = None) -> LoadReport:
    """Run ``config`` against its server and summarise it; ``info`` saves a GetModel call."""
    if config.concurrency < 1 or config.requests < 1 or config.images_per_request < 1:
        raise ValueError("concurrency, requests and images_per_request must be >= 1")
    info = info or await resolve_model(config.target, config.model, config.timeout_s)
    pool = max(_POOL_IMAGES, config.images_per_request)
    images = make_images(config.images, info.input_size, pool, config.seed, config.wire)
    warmup = config.concurrency if config.warmup_requests is None else config.warmup_requests
    histograms = _Histograms(config.metrics_url, info.name)
    processes = max(1, min(config.processes, config.concurrency))
    if processes == 1:
        samples = await _drive(
            config,
            info.name,
            images,
            config.concurrency,
            _Budget(config.requests),
            warmup,
            histograms.start,
        )
    else:
        samples = await _run_processes(config, info.name, images, processes, warmup, histograms)
    batch_sizes, wait_mean = await histograms.finish()
    config = dataclasses.replace(config, processes=processes)
    return summarize(
        samples,
        config,
        info.name,
        batch_sizes=batch_sizes,
        queue_wait_mean_s=wait_mean,
        metrics_note=histograms.note,
    )


async def sweep(
    base: LoadConfig,
    info: ModelInfo,
    methods: Sequence[str],
    concurrencies: Sequence[int],
    *,
    label: str = "",
) -> list[LoadReport]:
    """`run_load` for every method x concurrency (method-major), each a copy of ``base``; prints
    one line per point to stderr as it finishes (prefixed ``[label]`` when given)."""
    reports = []
    prefix = f"[{label}] " if label else ""
    for method in methods:
        for concurrency in concurrencies:
            config = dataclasses.replace(base, method=method, concurrency=concurrency)
            report = await run_load(config, info)
            reports.append(report)
            print(
                f"  {prefix}{method} C={concurrency}: {report.images_per_s:.1f} img/s, "
                f"p50 {report.latency.p50_s * 1e3:.1f} ms, errors {report.requests_failed}",
                file=sys.stderr,
            )
    return reports


async def _run_processes(
    config: LoadConfig,
    model: str,
    images: list[bytes],
    processes: int,
    warmup: int,
    histograms: _Histograms,
) -> Samples:
    """Spread the workers over spawned processes; the parent scrapes between the barriers."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    requests = ctx.Value("q", config.requests)  # one budget for all, so none idles early
    shares = zip(_split(config.concurrency, processes), _split(warmup, processes), strict=True)
    children = [
        ctx.Process(
            target=_child,
            args=(config, model, images, c, requests, w, barrier, results),
            name=f"vitlens-bench-client-{i}",
        )
        for i, (c, w) in enumerate(shares)
    ]
    for child in children:
        child.start()
    limit_s = 2 * config.timeout_s + config.duration_s + 120.0
    try:
        try:
            await asyncio.to_thread(barrier.wait, limit_s)
            await histograms.start()
            await asyncio.to_thread(barrier.wait, limit_s)
        except threading.BrokenBarrierError:
            pass  # a client failed before the window; its error is on the queue
        outcomes = [await asyncio.to_thread(results.get, True, limit_s) for _ in children]
    finally:
        for child in children:
            child.join(timeout=10.0)
            if child.is_alive():
                child.terminate()
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        raise failures[0]
    total = Samples()
    for o in outcomes:
        total = total.merge(o)
    return total
