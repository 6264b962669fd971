"""OpenTelemetry tracing (`vitlens_server.tracing`): a live server over real gRPC with an
in-memory exporter — the RPC's server span, and under it each request's ``vitlens.queue_wait``
and ``vitlens.model_pass`` in the caller's trace — and, with tracing off, nothing installed or
imported. Every traced server here has its own tracer provider; none is set globally."""

from __future__ import annotations

import asyncio
import contextvars
import io
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tests.tiny import tiny_loaded
from vitlens.v1 import tensor_pb2, vitlens_pb2, vitlens_pb2_grpc
from vitlens_server import tracing
from vitlens_server.app import VitlensServer
from vitlens_server.config import ServerConfig
from vitlens_server.models import ModelRegistry
from vitlens_server.runtime.batcher import Batcher, BatchStats

pytest.importorskip("opentelemetry.sdk.trace", reason="the tracing extra")
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

EXPLAIN = "/vitlens.v1.VitlensService/Explain"
PREDICT = "/vitlens.v1.VitlensService/Predict"
EVALUATE = "/vitlens.v1.VitlensService/Evaluate"
# a W3C trace context from the caller: every span of its call joins this trace
CALLER_TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{CALLER_TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Traced:
    server: VitlensServer
    stub: vitlens_pb2_grpc.VitlensServiceStub
    channel: grpc.aio.Channel
    spans: InMemorySpanExporter

    async def finished(self, condition: Callable[[list[ReadableSpan]], bool]) -> list:
        """The finished spans once ``condition`` holds for them (the server span ends as the
        handler returns, which may be after the client has its answer)."""
        for _ in range(400):
            spans = list(self.spans.get_finished_spans())
            if condition(spans):
                return spans
            await asyncio.sleep(0.01)
        raise AssertionError([s.name for s in self.spans.get_finished_spans()])


async def _started(config: ServerConfig, **kwargs) -> tuple[VitlensServer, grpc.aio.Channel]:
    model = tiny_loaded(seed=3, num_classes=10)  # the synthetic scenes' classes
    server = VitlensServer(config, ModelRegistry([model]), **kwargs)
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")


@pytest.fixture
async def traced() -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server, channel = await _started(
        ServerConfig(port=0, max_batch_size=4), tracing=tracing.Tracing(provider)
    )
    try:
        yield Traced(server, vitlens_pb2_grpc.VitlensServiceStub(channel), channel, exporter)
    finally:
        await channel.close()
        await server.stop(grace_s=1.0)
        provider.shutdown()


def _children(spans: list[ReadableSpan], parent: ReadableSpan, name: str) -> list[ReadableSpan]:
    return [
        s
        for s in spans
        if s.name == name and s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    (span,) = [s for s in spans if s.name == name]
    return span


def _check_data_plane_spans(
    spans: list[ReadableSpan], rpc: ReadableSpan, *, kind: str, images: int
) -> None:
    """One queue wait, then one model pass, both children of ``rpc`` in its trace."""
    (waited,) = _children(spans, rpc, tracing.QUEUE_WAIT)
    (ran,) = _children(spans, rpc, tracing.MODEL_PASS)
    for span in (waited, ran):
        assert span.context.trace_id == rpc.context.trace_id
        assert span.attributes["vitlens.model"] == "tiny"
        assert span.attributes["vitlens.kind"] == kind
        assert span.attributes["vitlens.replica"] == 0
        assert rpc.start_time <= span.start_time <= span.end_time <= rpc.end_time
    assert ran.attributes["vitlens.batch.images"] == images
    assert ran.attributes["vitlens.batch.requests"] == 1
    assert waited.attributes["vitlens.queue_wait_seconds"] >= 0
    assert waited.end_time == ran.start_time  # the wait ends as the pass starts
    assert ran.status.is_ok


async def test_explain_and_predict_spans_nest_under_the_rpc_span(traced: Traced) -> None:
    assert not traced.spans.get_finished_spans()  # warm-up ran outside any traced call
    images = [tensor_pb2.Image(encoded=_png(i)) for i in range(2)]
    reply = await traced.stub.Explain(
        vitlens_pb2.ExplainRequest(model="tiny", method="generic", images=images),
        metadata=(("traceparent", TRACEPARENT),),
        timeout=60,
    )
    assert len(reply.results) == 2
    spans = await traced.finished(lambda s: any(x.name == EXPLAIN for x in s))
    explain = _one(spans, EXPLAIN)
    assert explain.kind == trace.SpanKind.SERVER
    assert explain.context.trace_id == CALLER_TRACE_ID  # the caller's trace continues
    assert explain.parent.span_id == CALLER_SPAN_ID and explain.parent.is_remote
    _check_data_plane_spans(spans, explain, kind="explain-backward", images=2)

    traced.spans.clear()
    await traced.stub.Predict(
        vitlens_pb2.PredictRequest(model="tiny", images=images[:1]), timeout=60
    )
    spans = await traced.finished(lambda s: any(x.name == PREDICT for x in s))
    predict = _one(spans, PREDICT)
    assert predict.parent is None  # a caller without a trace starts one here
    _check_data_plane_spans(spans, predict, kind="predict", images=1)
    assert len(spans) == 3


async def test_concurrent_requests_each_get_their_own_spans(traced: Traced) -> None:
    """Requests sharing a batch: each trace gets its own wait and pass, with the batch's
    sizes."""
    request = vitlens_pb2.PredictRequest(model="tiny", images=[tensor_pb2.Image(encoded=_png(7))])
    await asyncio.gather(*(traced.stub.Predict(request, timeout=60) for _ in range(6)))
    spans = await traced.finished(lambda s: sum(x.name == PREDICT for x in s) == 6)
    rpcs = [s for s in spans if s.name == PREDICT]
    assert len({s.context.trace_id for s in rpcs}) == 6
    for rpc in rpcs:
        (ran,) = _children(spans, rpc, tracing.MODEL_PASS)
        assert 1 <= ran.attributes["vitlens.batch.requests"] <= 4  # max_batch_size 4
        assert ran.attributes["vitlens.batch.images"] == ran.attributes["vitlens.batch.requests"]
        assert len(_children(spans, rpc, tracing.QUEUE_WAIT)) == 1


async def test_evaluate_model_calls_join_the_evaluate_trace(traced: Traced) -> None:
    """Evaluate's run thread submits its model calls from the call's context: they land
    under the Evaluate span, like Explain's."""
    request = vitlens_pb2.EvaluateRequest(
        model="tiny",
        methods=["generic"],
        metrics=["segmentation"],
        dataset=vitlens_pb2.Dataset(synthetic="synthetic:3"),
    )
    events = [event async for event in traced.stub.Evaluate(request, timeout=60)]
    assert events[-1].WhichOneof("event") == "result"
    spans = await traced.finished(lambda s: any(x.name == EVALUATE for x in s))
    _check_data_plane_spans(spans, _one(spans, EVALUATE), kind="explain-backward", images=3)


async def test_errors_and_health_checks(traced: Traced) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await traced.stub.Explain(
            vitlens_pb2.ExplainRequest(model="nope", images=[tensor_pb2.Image(encoded=b"x")]),
            timeout=60,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    health = health_pb2_grpc.HealthStub(traced.channel)
    await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    spans = await traced.finished(lambda s: any(x.name == EXPLAIN for x in s))
    explain = _one(spans, EXPLAIN)
    # the OpenTelemetry interceptor is outermost: it sees the status the vitlens one mapped
    assert explain.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # (NOT_FOUND is the caller's error: by the semantic conventions not a server span error)
    assert not _children(spans, explain, tracing.MODEL_PASS)  # refused before any batch
    assert [s.name for s in spans] == [EXPLAIN]  # and health checks are not traced


async def test_tracing_off_installs_nothing() -> None:
    before = grpc.aio.server
    server, channel = await _started(ServerConfig(port=0))
    try:
        assert server.tracing is None
        stub = vitlens_pb2_grpc.VitlensServiceStub(channel)
        request = vitlens_pb2.PredictRequest(
            model="tiny", images=[tensor_pb2.Image(encoded=_png(1))]
        )
        await stub.Predict(request, timeout=60)
    finally:
        await channel.close()
        await server.stop(grace_s=1.0)
    assert grpc.aio.server is before
    # no tracer provider became OpenTelemetry's global one, here or in the traced tests
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)


@pytest.mark.slow  # a fresh interpreter importing torch: about 5 s
def test_a_server_without_tracing_never_imports_opentelemetry() -> None:
    code = textwrap.dedent(
        """
        import asyncio, sys
        from tests.tiny import tiny_loaded
        from vitlens_server.app import VitlensServer
        from vitlens_server.config import ServerConfig
        from vitlens_server.models import ModelRegistry

        async def main():
            server = VitlensServer(ServerConfig(port=0), ModelRegistry([tiny_loaded()]))
            await server.start(warm_up=False)
            await server.stop(grace_s=0.1)

        asyncio.run(main())
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not loaded, loaded
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]


def test_tracing_without_the_extra_is_refused_with_what_to_install(monkeypatch) -> None:
    from vitlens_server import cli
    from vitlens_server.cli import build_parser, config_from_args, main

    monkeypatch.setattr(cli, "configure_logging", lambda *args: None)  # keep pytest's logging
    with monkeypatch.context() as missing:
        missing.setitem(sys.modules, "opentelemetry.instrumentation.grpc", None)  # uninstalled
        with pytest.raises(tracing.TracingUnavailable, match="opentelemetry-instrumentation-grpc"):
            tracing.require("console")
        with pytest.raises(tracing.TracingUnavailable, match=r"'vitlens-server\[tracing\]'"):
            config_from_args(build_parser().parse_args(["--tracing"]))
        assert main(["--tracing", "--port", "0"]) == 2  # refused before any model loads
    args = build_parser().parse_args(["--tracing", "--tracing-exporter", "console"])
    config = config_from_args(args)
    assert config.tracing and config.tracing_exporter == "console"
    assert not config_from_args(build_parser().parse_args([])).tracing  # off by default


@pytest.mark.parametrize("exporter", tracing.EXPORTERS)
def test_the_configured_providers(exporter: str) -> None:
    """OTLP builds without a collector reachable (it connects lazily) and console prints."""
    made = tracing.Tracing.from_config(ServerConfig(tracing=True, tracing_exporter=exporter))
    assert made is not None
    assert made.provider.resource.attributes["service.name"] == "vitlens"
    made.shutdown()
    assert tracing.Tracing.from_config(ServerConfig()) is None


async def test_the_batcher_hands_on_batch_each_submitters_context_and_done_the_results() -> None:
    """The seam tracing uses (`BatchStats.contexts`, `BatchDone`), without OpenTelemetry."""
    caller = contextvars.ContextVar("caller")
    seen: list[tuple[list[str], list[object]]] = []

    def on_batch(stats: BatchStats):
        names = [context.run(caller.get) for context in stats.contexts]
        return lambda results: seen.append((names, list(results)))

    def run(replica: int, items: list[str], interrupted) -> list:
        return [ValueError(item) if item == "bad" else item.upper() for item in items]

    batcher = Batcher(
        run, [ThreadPoolExecutor(1)], max_batch_size=8, max_delay_s=0.05, on_batch=on_batch
    )
    batcher.start()

    async def submit(name: str, item: str):
        caller.set(name)
        return await batcher.submit(item, images=1, kind="k")

    results = await asyncio.gather(
        submit("alice", "a"), submit("bob", "bad"), return_exceptions=True
    )
    await batcher.stop()
    assert results[0][0] == "A" and isinstance(results[1], ValueError)
    ((names, done),) = seen
    assert names == ["alice", "bob"]
    assert done[0] == "A" and isinstance(done[1], ValueError)
