"""Server lifecycle over real gRPC: NOT_SERVING until warmed up; a drain loses no accepted call."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import vitlens
from tests.polling import wait_for
from tests.tiny import tiny_loaded
from vitlens_server.app import VitlensServer
from vitlens_server.config import ServerConfig
from vitlens_server.models import ModelRegistry


class Running:
    """A server started on its own event-loop thread, with ``start()`` possibly still running."""

    def __init__(self, server: VitlensServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.start())
        self.started.set()
        self.loop.run_forever()

    def call(self, coro, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def test_health_is_not_serving_until_the_models_are_warmed_up() -> None:
    server = VitlensServer(ServerConfig(port=0), ModelRegistry([tiny_loaded(seed=7)]))
    release = threading.Event()
    real_warm_up = server.plane.warm_up

    async def held_warm_up() -> None:
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        await real_warm_up()

    server.plane.warm_up = held_warm_up
    running = Running(server)
    try:
        wait_for(lambda: server.port is not None and server.health is not None)
        address = f"127.0.0.1:{server.port}"
        wait_for(lambda: _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert not running.started.is_set()
        release.set()
        assert running.started.wait(60)
        assert _health(address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        running.started.wait(60)
        running.call(server.stop(grace_s=1.0))
        running.close()


def test_a_drain_finishes_every_accepted_request_and_refuses_new_ones() -> None:
    # Requests wait up to 500 ms for batch-mates, so all are in flight when the drain starts.
    config = ServerConfig(port=0, max_batch_size=64, max_delay_ms=500, cache_bytes=0)
    server = VitlensServer(config, ModelRegistry([tiny_loaded(seed=8)]))
    running = Running(server)
    assert running.started.wait(60)
    address = f"127.0.0.1:{server.port}"
    registry = server.telemetry.registry
    images = [np.full((32, 32, 3), i, np.uint8) for i in range(12)]
    client = vitlens.Client(address, timeout_s=60)
    try:
        with client, ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(client.explain, image, method="rollout") for image in images]
            wait_for(
                lambda: (
                    registry.get_sample_value("vitlens_in_flight_requests", {"rpc": "Explain"})
                    == 12
                )
            )
            running.call(server.stop(grace_s=30))  # returns once the drain is complete
            results = [f.result() for f in futures]  # every accepted request succeeded
            assert all(r[0].explanations for r in results)
            with pytest.raises(vitlens.UnavailableError):
                client.explain(images[0], method="rollout", timeout_s=5)
    finally:
        running.close()


@pytest.mark.slow
def test_the_default_deadline_drops_calls_that_set_none() -> None:
    # Lone requests wait 2 s for batch-mates; the 0.2 s default deadline expires first.
    config = ServerConfig(port=0, max_delay_ms=2000, default_deadline_s=0.2, cache_bytes=0)
    server = VitlensServer(config, ModelRegistry([tiny_loaded(seed=8)]))
    running = Running(server)
    assert running.started.wait(60)
    try:
        client = vitlens.Client(f"127.0.0.1:{server.port}", timeout_s=None)  # no deadline
        with client, pytest.raises(vitlens.DeadlineExceededError, match="deadline passed"):
            client.predict(np.zeros((32, 32, 3), np.uint8))
    finally:
        running.call(server.stop(grace_s=1.0))
        running.close()


@pytest.mark.slow
def test_sigterm_drains_and_exits_zero() -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free port for the child
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-m", "vitlens_server", "--port", str(port), "--threads", "1",
         "--model", "tiny=vit_tiny_patch16_224:random"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with vitlens.Client(f"127.0.0.1:{port}", timeout_s=30) as client:
            client.wait_ready(timeout_s=120)  # health SERVING: loaded and warmed up
            assert client.predict(np.zeros((32, 32, 3), np.uint8))[0].predictions
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 0, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
