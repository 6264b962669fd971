"""OpenTelemetry tracing of the request path: ``vitlens serve --tracing``, off by default.

Every call of the Vitlens service (and the Open Inference Protocol's) gets a server span from
opentelemetry-instrumentation-grpc; the data plane adds, per request and per chunk of it::

    /vitlens.v1.VitlensService/Explain        server span (trace context from the caller)
    ├── vitlens.queue_wait                    submitted → its batch starts
    └── vitlens.model_pass                    the batch's run on its replica

Both are children of the request's server span, opened in the `contextvars.Context` the
request was submitted from (the batcher keeps it, `BatchStats.contexts`), so they land in the
caller's trace although the batch runs on a replica thread and serves several requests. Work
outside any traced call (warm-up) opens no spans.

opentelemetry is imported only here, and only when tracing is on: the server runs without the
``tracing`` extra, and ``--tracing`` without it is refused with the pip command. No global state
is touched: the tracer provider is passed to the gRPC interceptor and to our tracer, never
installed as OpenTelemetry's global one, so tests give each server their own provider.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vitlens_server.runtime.batcher import BatchDone, BatchStats

if TYPE_CHECKING:
    import grpc
    from opentelemetry.sdk.trace import TracerProvider

    from vitlens_server.config import ServerConfig
    from vitlens_server.runtime.plane import Observer

__all__ = [
    "EXPORTERS",
    "MODEL_PASS",
    "QUEUE_WAIT",
    "Tracing",
    "TracingUnavailable",
    "require",
    "tracer_provider",
]

log = logging.getLogger("vitlens.tracing")

QUEUE_WAIT = "vitlens.queue_wait"
MODEL_PASS = "vitlens.model_pass"
EXPORTERS = ("otlp", "console")
INSTRUMENTATION = "vitlens_server"

# module → the package that brings it (what `--tracing` needs, by exporter)
_NEEDS = {
    "opentelemetry.sdk.trace": "opentelemetry-sdk",
    "opentelemetry.instrumentation.grpc": "opentelemetry-instrumentation-grpc",
}
_OTLP_EXPORTER = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
_OTLP = {_OTLP_EXPORTER: "opentelemetry-exporter-otlp-proto-grpc"}


class TracingUnavailable(ValueError):
    """Tracing was asked for, but the OpenTelemetry packages are not installed."""


def require(exporter: str = "otlp") -> None:
    """Raise `TracingUnavailable`, naming what to install, unless tracing with ``exporter``
    can run here."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown trace exporter {exporter!r}; choose one of {EXPORTERS}")
    needed = {**_NEEDS, **(_OTLP if exporter == "otlp" else {})}
    missing = []
    for module, package in needed.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise TracingUnavailable(
            f"--tracing needs OpenTelemetry ({', '.join(missing)} not installed): "
            "pip install 'vitlens-server[tracing]'"
        )


def tracer_provider(exporter: str = "otlp") -> TracerProvider:
    """A tracer provider exporting every span: ``otlp`` over gRPC to the collector the standard
    ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` names (default localhost:4317), in batches; or
    ``console``, each span printed as JSON on stdout as it ends (debugging).

    The rest of the standard OTEL_* environment applies: sampler, resource attributes, headers.
    The service is ``OTEL_SERVICE_NAME``, else ``vitlens``."""
    require(exporter)
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or "vitlens"})
    provider = TracerProvider(resource=resource)
    if exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class Tracing:
    """Traces one server: its gRPC calls and its data plane's queue waits and model passes.

    Args:
        provider: where the spans go (an SDK ``TracerProvider``; tests pass one with an
            in-memory exporter).
        owned: shut the provider down (flushing its spans) in `shutdown`; false for a provider
            the caller keeps.
    """

    def __init__(self, provider: TracerProvider, *, owned: bool = False) -> None:
        require("console")  # the SDK and the gRPC instrumentation, whatever the exporter
        self.provider = provider
        self._owned = owned
        self._tracer = provider.get_tracer(INSTRUMENTATION)

    @classmethod
    def from_config(cls, config: ServerConfig) -> Tracing | None:
        """The tracing ``config`` asks for (None: off)."""
        if not config.tracing:
            return None
        return cls(tracer_provider(config.tracing_exporter), owned=True)

    def server_interceptor(self) -> grpc.aio.ServerInterceptor:
        """OpenTelemetry's grpc.aio server interceptor with this server's provider, for
        `build_server` to put outermost (health and reflection calls are not traced)."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        untraced = filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection"))
        return aio_server_interceptor(
            tracer_provider=self.provider, filter_=filters.negate(untraced)
        )

    def observer(self, inner: Observer) -> Observer:
        """The data plane's observer: ``inner`` (the metrics), and this server's spans."""
        return _TracedObserver(inner, self)

    def on_batch(self, model: str, stats: BatchStats) -> BatchDone | None:
        """Open a queue-wait and a model-pass span per traced request of a starting batch;
        returns what ends the model passes when the batch's run ends. Never raises: tracing
        must not fail a request."""
        try:
            return self._batch_spans(model, stats)
        except Exception:
            log.exception("tracing a batch failed; its spans are lost")
            return None

    def shutdown(self) -> None:
        """Export what is left and stop (a provider the caller passed in is left running)."""
        if self._owned:
            self.provider.shutdown()

    def _batch_spans(self, model: str, stats: BatchStats) -> BatchDone | None:
        from opentelemetry import context, trace

        if len(stats.contexts) != stats.requests:
            return None
        now_ns = time.time_ns()
        kind = _kind_name(stats.kind)
        common = {"vitlens.model": model, "vitlens.kind": kind, "vitlens.replica": stats.replica}
        batch = {
            **common,
            "vitlens.batch.images": stats.images,
            "vitlens.batch.requests": stats.requests,
        }
        passes = []
        for index, (submitted, wait_s) in enumerate(
            zip(stats.contexts, stats.queue_waits_s, strict=True)
        ):
            parent = submitted.run(context.get_current)
            if not trace.get_current_span(parent).get_span_context().is_valid:
                continue  # not inside a traced call (warm-up): no orphan root spans
            waited = self._tracer.start_span(
                QUEUE_WAIT,
                context=parent,
                start_time=now_ns - round(wait_s * 1e9),
                attributes={**common, "vitlens.queue_wait_seconds": wait_s},
            )
            waited.end(end_time=now_ns)
            span = self._tracer.start_span(
                MODEL_PASS, context=parent, start_time=now_ns, attributes=batch
            )
            passes.append((index, span))
        if not passes:
            return None
        return lambda results: _end_passes(passes, results)


def _end_passes(passes: list[tuple[int, Any]], results: Sequence[object]) -> None:
    """End each request's model-pass span, ERROR where its result is an exception (or the run
    never finished)."""
    from opentelemetry.trace import Status, StatusCode

    try:
        for index, span in passes:
            if index >= len(results):
                span.set_status(Status(StatusCode.ERROR, "the batch's run did not finish"))
            elif isinstance(result := results[index], BaseException):
                span.set_status(Status(StatusCode.ERROR, type(result).__name__))
                span.record_exception(result)
            span.end()
    except Exception:
        log.exception("ending the model-pass spans failed")


def _kind_name(kind: object) -> str:
    """("explain", Cost.BACKWARD) → "explain-backward"; ("predict",) → "predict" (the same as
    the metrics' kind label)."""
    if isinstance(kind, tuple):
        return "-".join(getattr(part, "name", str(part)).lower() for part in kind)
    return str(kind)


class _TracedObserver:
    """`runtime.plane.Observer`: the metrics observer's calls, then the batch's spans."""

    def __init__(self, inner: Observer, tracing: Tracing) -> None:
        self._inner = inner
        self._tracing = tracing

    def on_cache(self, model: str, hits: int, misses: int) -> None:
        self._inner.on_cache(model, hits, misses)

    def on_batch(self, model: str, stats: BatchStats) -> BatchDone | None:
        self._inner.on_batch(model, stats)
        return self._tracing.on_batch(model, stats)
