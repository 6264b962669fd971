"""Scheduling by cost over real gRPC: a cheap request is answered while a slow batch of another
cost class is stuck on the device (token_reflection's extra forwards) or on the CPU
(attention_flow's max-flow). (`tests/unit/test_batcher.py` shows kinds never share a batch.)"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from tests.conftest import start_server
from tests.tiny import tiny_loaded
from vitlens.client import build_explain_request
from vitlens.v1 import vitlens_pb2_grpc
from vitlens_server.config import ServerConfig
from vitlens_server.explain import maxflow
from vitlens_server.models import ModelRegistry


class Gate:
    """Blocks whatever calls it until opened; ``entered`` says something is blocked."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def wait(self) -> None:
        self.entered.set()
        assert self.opened.wait(60), "the gate was never opened"


@pytest.fixture
def served():
    model = tiny_loaded(seed=6)
    config = ServerConfig(port=0, cache_bytes=0, max_delay_ms=0)
    running, stop = start_server(config, ModelRegistry([model]))
    with grpc.insecure_channel(running.address) as channel:
        yield running, model, vitlens_pb2_grpc.VitlensServiceStub(channel)
    stop()


def _request(method: str, images: int, seed: int, **options):
    rng = np.random.default_rng(seed)
    pixels = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(images)]
    return build_explain_request(pixels, method=method, method_options=options or None)


def _stuck_while(stub, slow_request, gate: Gate, cheap_requests) -> None:
    """Send ``slow_request``; once it is stuck at ``gate``, every cheap request is answered."""
    slow = stub.Explain.future(slow_request, timeout=60)
    assert gate.entered.wait(60)
    for request in cheap_requests:
        reply = stub.Explain(request, timeout=30)  # would time out behind the stuck batch
        assert len(reply.results) == len(request.images)
    assert not slow.done()
    gate.opened.set()
    assert len(slow.result().results) == len(slow_request.images)


def test_cheap_requests_pass_a_token_reflection_batch_stuck_on_the_device(served) -> None:
    _running, model, stub = served
    gate = Gate()

    def block_masked_forwards(_module, inputs) -> None:
        if inputs[0].shape[0] == 1:  # token_reflection's masked images, batch_size=1
            gate.wait()

    handle = model.module.register_forward_pre_hook(block_masked_forwards)
    try:
        cheap = [_request(m, 2, i) for i, m in enumerate(("generic", "rollout", "generic"))]
        _stuck_while(stub, _request("token_reflection", 1, 9, batch_size=1), gate, cheap)
    finally:
        handle.remove()


def test_cheap_requests_pass_an_attention_flow_batch_stuck_on_the_cpu(served, monkeypatch) -> None:
    _running, _model, stub = served
    gate = Gate()
    solve = maxflow.max_flow_values

    def blocked(*args, **kwargs):
        gate.wait()
        return solve(*args, **kwargs)

    monkeypatch.setattr(maxflow, "max_flow_values", blocked)
    cheap = [_request(m, 2, i) for i, m in enumerate(("generic", "rollout", "saliency"))]
    _stuck_while(stub, _request("attention_flow", 1, 9), gate, cheap)
