"""The assembled server: data plane, gRPC server, health, telemetry, tracing, and their lifecycle.

    server = VitlensServer(config, registry)
    port = await server.start()     # NOT_SERVING until every model is warmed up
    ...
    await server.stop()             # drain: in-flight calls finish within the grace period

Stopping refuses new calls at once, gives accepted calls ``grace_s`` to finish, then fails what
is left with UNAVAILABLE (queued work at once, running batches at their next step) and joins
every thread, so the process can exit within a few seconds of the grace period.

Tracing (`vitlens_server.tracing`, ``config.tracing``) is off by default; when on, the gRPC
server is created with OpenTelemetry's interceptor and the data plane reports its batches to the
tracer as well as to the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health, health_pb2

from vitlens_server.config import ServerConfig
from vitlens_server.models import LoadedModel, ModelRegistry
from vitlens_server.rpc.server import SERVICE_NAME, build_server
from vitlens_server.runtime.plane import DEFAULT_METHOD, DataPlane, cuda_memory
from vitlens_server.telemetry import Telemetry
from vitlens_server.tracing import Tracing

__all__ = ["VitlensServer"]

log = logging.getLogger("vitlens.server")

# After the data plane has failed what the grace period left, grpc gets this long to send the
# last answers before it cancels the calls itself.
ANSWER_MARGIN_S = 2.0


class VitlensServer:
    """A running vitlens gRPC server over already-loaded models.

    ``replicas``: further copies of a model on other devices, by model name. ``tracing``: the
    server's tracing (default: what ``config.tracing`` asks for, None when off); tests pass a
    `Tracing` over their own tracer provider.
    """

    def __init__(
        self,
        config: ServerConfig,
        registry: ModelRegistry,
        replicas: Mapping[str, Sequence[LoadedModel]] | None = None,
        *,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.telemetry = Telemetry()
        self.tracing = tracing if tracing is not None else Tracing.from_config(config)
        observer = self.telemetry if self.tracing is None else self.tracing.observer(self.telemetry)
        self.plane = DataPlane(config, registry, replicas, observer=observer)
        for model in registry:
            self.telemetry.watch_queue(model.name, lambda m=model.name: self.plane.queued_images(m))
            for replica in [model, *(replicas or {}).get(model.name, ())]:
                if replica.device.type == "cuda":
                    self.telemetry.watch_device(str(replica.device), cuda_memory(replica.device))
        self.health: health.aio.HealthServicer | None = None
        self.metrics_port: int | None = None
        self.port: int | None = None
        self._grpc: grpc.aio.Server | None = None

    async def start(self, *, warm_up: bool = True) -> int:
        """Bind and serve; health says NOT_SERVING until every model is warmed up, then SERVING.

        Returns the bound port. Call from the event loop that will run the server. ``warm_up``
        runs one small pass of each kind per model first (kernels, allocator, compiled
        solvers), so the first real request is not the slow one.
        """
        self.health = health.aio.HealthServicer()
        traced = [self.tracing.server_interceptor()] if self.tracing is not None else []
        self._grpc, self.port = build_server(
            self.config, self.plane, self.health, self.telemetry, DEFAULT_METHOD, traced
        )
        self.plane.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.telemetry.serve(self.config.metrics_port, self.config.host)
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._grpc.start()
        log.info(
            "vitlens listening on %s:%d (not serving until warmed up)", self.config.host, self.port
        )
        if warm_up:
            started = time.perf_counter()
            await self.plane.warm_up()
            log.info("warmed up in %.1f s", time.perf_counter() - started)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("vitlens serving on %s:%d", self.config.host, self.port)
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let accepted ones finish within the grace period, then
        fail the rest with UNAVAILABLE and stop."""
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        # grpc refuses new calls from here on; it cancels calls still open after its grace
        grpc_stopped = asyncio.ensure_future(self._grpc.stop(grace + ANSWER_MARGIN_S))
        await self.plane.drain(grace)
        await grpc_stopped
        self.telemetry.close()
        await asyncio.to_thread(self.plane.close)
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # export the last spans

    async def wait_for_termination(self) -> None:
        await self._grpc.wait_for_termination()

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
