"""Abandoned work stops: a call that is cancelled or passes its deadline while its batch runs
stops that batch at the next step (here: the next extra forward of token_reflection).

The served model counts its forward passes; the 5th masked-image forward of the abandoned call
blocks until the server has seen the call end, so what runs afterwards is exactly what the
interruption failed to stop.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from tests.conftest import start_server
from tests.polling import wait_for
from tests.tiny import tiny_loaded
from vitlens.client import build_explain_request
from vitlens.v1 import vitlens_pb2_grpc
from vitlens_server.config import ServerConfig
from vitlens_server.models import ModelRegistry

IMAGES = 4  # x 16 patch tokens: 64 masked-image forwards of one image each
BLOCK_AT = 5


class Forwards:
    """Counts the model's single-image forwards (token_reflection's masked images with
    ``batch_size=1``), blocking the ``BLOCK_AT``-th until ``proceed`` is set."""

    def __init__(self) -> None:
        self.count = 0
        self.reached = threading.Event()
        self.proceed = threading.Event()

    def __call__(self, _module, inputs) -> None:
        if inputs[0].shape[0] != 1:
            return
        self.count += 1
        if self.count == BLOCK_AT:
            self.reached.set()
            assert self.proceed.wait(60), "the test never released the blocked forward"


@pytest.fixture
def served():
    model = tiny_loaded(seed=3)
    running, stop = start_server(ServerConfig(port=0, cache_bytes=0), ModelRegistry([model]))
    forwards = Forwards()
    handle = model.module.register_forward_pre_hook(forwards)  # after the warm-up
    with grpc.insecure_channel(running.address) as channel:
        yield running, vitlens_pb2_grpc.VitlensServiceStub(channel), forwards
    handle.remove()
    stop()


def _request(images: int, batch_size: int):
    rng = np.random.default_rng(images)
    pixels = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(images)]
    return build_explain_request(
        pixels, method="token_reflection", method_options={"batch_size": batch_size}
    )


def _in_flight(running) -> float:
    registry = running.server.telemetry.registry
    return registry.get_sample_value("vitlens_in_flight_requests", {"rpc": "Explain"}) or 0


def _after_abandoning(running, stub, forwards: Forwards) -> int:
    """Release the blocked forward once the server has ended the call; then run a call on the
    same lane (its batches are of 2 images: not counted) so the abandoned batch has ended."""
    wait_for(lambda: _in_flight(running) == 0)
    forwards.proceed.set()
    reply = stub.Explain(_request(2, 256), timeout=60)
    assert len(reply.results) == 2
    return forwards.count


def test_a_cancelled_call_stops_its_running_batch(served) -> None:
    running, stub, forwards = served
    call = stub.Explain.future(_request(IMAGES, 1), timeout=60)
    assert forwards.reached.wait(60)
    call.cancel()
    count = _after_abandoning(running, stub, forwards)
    assert count == BLOCK_AT, f"{count} of {IMAGES * 16} masked forwards ran"
    assert call.cancelled()


def test_a_call_past_its_deadline_stops_its_running_batch(served) -> None:
    running, stub, forwards = served
    call = stub.Explain.future(_request(IMAGES, 1), timeout=2.0)
    assert forwards.reached.wait(60)
    with pytest.raises(grpc.RpcError) as caught:
        call.result()  # the deadline passes while the 5th forward is blocked
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    count = _after_abandoning(running, stub, forwards)
    assert count == BLOCK_AT, f"{count} of {IMAGES * 16} masked forwards ran"
