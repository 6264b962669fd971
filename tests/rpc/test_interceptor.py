"""The RPC layer alone, over real gRPC, in front of a fake data plane: every error becomes its
status in the one interceptor — unary and streaming, domain errors, retry hints and
unexpected faults (INTERNAL with an incident id, traceback logged) — with request ids and
metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health

from tests.polling import wait_for
from vitlens.v1 import tensor_pb2, vitlens_pb2, vitlens_pb2_grpc
from vitlens_server.config import ServerConfig
from vitlens_server.domain import Progress
from vitlens_server.errors import InvalidArgument, ResourceExhausted
from vitlens_server.rpc.server import build_server
from vitlens_server.telemetry import Telemetry


class FakePlane:
    """A `DataPlaneApi` whose answers are errors chosen by the test."""

    default_model = "fake"
    method_names = frozenset({"generic"})
    error: BaseException = RuntimeError("a bug in the data plane")

    def models(self):
        return []

    def model(self, name: str):
        raise InvalidArgument(f"no model {name!r} here")

    async def explain(self, query):
        raise self.error

    async def predict(self, query):
        raise ResourceExhausted("the queue is full; retry after about 0.2 s", retry_after_s=0.25)

    async def evaluate(self, query) -> AsyncIterator[Progress]:
        yield Progress(1, 2, 1.0, 1.0, "fake")
        raise self.error


@pytest.fixture(scope="module")
def fake():
    plane, telemetry = FakePlane(), Telemetry()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder = {}

    async def start() -> None:
        server, port = build_server(
            ServerConfig(port=0), plane, health.aio.HealthServicer(), telemetry
        )
        await server.start()
        holder.update(server=server, port=port)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30)
    with grpc.insecure_channel(f"127.0.0.1:{holder['port']}") as channel:
        yield plane, telemetry, vitlens_pb2_grpc.VitlensServiceStub(channel)
    asyncio.run_coroutine_threadsafe(holder["server"].stop(None), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_an_unexpected_fault_is_internal_with_an_incident_id(fake, caplog) -> None:
    plane, _telemetry, stub = fake
    plane.error = RuntimeError("a bug in the data plane")
    request = vitlens_pb2.ExplainRequest(images=[tensor_pb2.Image(encoded=b"x")])
    with caplog.at_level(logging.ERROR, logger="vitlens.rpc"):
        err = _error(lambda: stub.Explain(request, timeout=10))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "incident" in err.details() and "a bug" not in err.details()  # nothing leaks
    incident = err.details().split("incident ")[1].split(")")[0]
    (record,) = [r for r in caplog.records if incident in r.getMessage()]
    assert record.exc_info and "a bug in the data plane" in str(record.exc_info[1])


def test_a_stream_failing_midway_gets_its_status_after_its_events(fake) -> None:
    plane, _telemetry, stub = fake
    plane.error = InvalidArgument("sample 3 is corrupt")
    request = vitlens_pb2.EvaluateRequest(methods=["generic"], metrics=["segmentation"])
    events = []
    call = stub.Evaluate(request, timeout=10, metadata=(("x-request-id", "stream-7"),))
    err = _error(lambda: events.extend(call))
    assert [e.progress.done for e in events] == [1]
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == "sample 3 is corrupt"
    assert ("x-request-id", "stream-7") in err.trailing_metadata()


def test_retry_hints_travel_as_pushback_trailers(fake) -> None:
    _plane, _telemetry, stub = fake
    request = vitlens_pb2.PredictRequest(images=[tensor_pb2.Image(encoded=b"x")])
    err = _error(lambda: stub.Predict(request, timeout=10))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(err.trailing_metadata())
    assert trailers["grpc-retry-pushback-ms"] == "250" and trailers["x-request-id"]


def test_calls_are_counted_by_rpc_method_and_code(fake) -> None:
    plane, telemetry, stub = fake
    plane.error = InvalidArgument("bad")
    sample = telemetry.registry.get_sample_value
    labels = {"rpc": "Explain", "method": "unknown", "code": "INVALID_ARGUMENT"}
    before = sample("vitlens_requests_total", labels) or 0
    request = vitlens_pb2.ExplainRequest(method="no-such-method")  # label bounded to "unknown"
    _error(lambda: stub.Explain(request, timeout=10))
    # counted as the handler ends, maybe after the answer
    wait_for(lambda: (sample("vitlens_requests_total", labels) or 0) == before + 1, 10)
    assert sample("vitlens_in_flight_requests", {"rpc": "Explain"}) == 0
