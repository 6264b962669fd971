"""Assemble the grpc.aio server: the Vitlens service, grpc.health.v1 and reflection."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vitlens.v1 import vitlens_pb2, vitlens_pb2_grpc
from vitlens_server.config import ServerConfig
from vitlens_server.metrics import Metrics
from vitlens_server.models import LoadedModel, ModelRegistry
from vitlens_server.rpc.security import BearerTokenAuth, server_credentials
from vitlens_server.rpc.servicer import VitlensServicer
from vitlens_server.runtime import ModelWorker, WorkerPool

__all__ = ["SERVICE_NAME", "VitlensServer"]

log = logging.getLogger("vitlens.server")

SERVICE_NAME = vitlens_pb2.DESCRIPTOR.services_by_name["Vitlens"].full_name


class VitlensServer:
    """A running vitlens gRPC server over already-loaded models.

    Usage::

        server = VitlensServer(config, registry)
        port = await server.start()
        ...
        await server.stop()
    """

    def __init__(
        self,
        config: ServerConfig,
        registry: ModelRegistry,
        replicas: Mapping[str, Sequence[LoadedModel]] | None = None,
    ) -> None:
        """``replicas``: further copies of a model on other devices, by model name."""
        self.config = config
        self.registry = registry
        self.metrics = Metrics()
        self.workers = WorkerPool(
            ModelWorker(
                model,
                replicas=(replicas or {}).get(model.name, ()),
                max_batch_size=config.max_batch_size,
                max_delay_s=config.max_delay_ms / 1000,
                max_queue_images=config.max_queue_images,
                on_batch=self.metrics.on_batch,
            )
            for model in registry
        )
        for worker in self.workers:
            self.metrics.watch_queue(worker.model.name, lambda w=worker: w.queued_images)
            for replica in [worker.model, *(replicas or {}).get(worker.model.name, ())]:
                self.metrics.watch_device(str(replica.device))
        self.servicer = VitlensServicer(config, registry, self.workers, self.metrics)
        self.metrics_port: int | None = None
        self.health: health.aio.HealthServicer | None = None
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self, *, warm_up: bool = True) -> int:
        """Bind and serve; health says NOT_SERVING until every model is warmed up, then SERVING.

        Returns the bound port. Call from the event loop that will run the server (grpc.aio
        binds to it). ``warm_up`` runs one small pass of each kind per model first (kernels,
        allocator, compiled solvers), so the first real request is not the slow one.
        """
        self._server = self._build()
        self.workers.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        address = f"{self.config.host}:{self.config.port}"
        config = self.config
        if config.tls_cert is not None:
            credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
            self.port = self._server.add_secure_port(address, credentials)
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        log.info(
            "vitlens listening on %s:%d (not serving until warmed up)", self.config.host, self.port
        )
        if warm_up:
            started = time.perf_counter()
            await self.workers.warm_up()
            log.info("warmed up in %.1f s", time.perf_counter() - started)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("vitlens serving on %s:%d", self.config.host, self.port)
        return self.port

    def _build(self) -> grpc.aio.Server:
        limit = self.config.max_message_bytes
        server = grpc.aio.server(
            interceptors=[BearerTokenAuth(self.config.auth_tokens)]
            if self.config.auth_tokens
            else [],
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.keepalive_permit_without_calls", 1),
                # Accept client keepalive pings every 10 s even while a call sends nothing (a
                # long Evaluate step): gRPC's default, 5 min, answers the SDK's 60 s pings with
                # GOAWAY "too many pings". (The C macro says RECV; the key does not.)
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        self.health = health.aio.HealthServicer()
        vitlens_pb2_grpc.add_VitlensServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server

    async def stop(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight calls finish within the grace period, then stop."""
        await self.health.enter_graceful_shutdown()
        grace = self.config.grace_s if grace_s is None else grace_s
        await self._server.stop(grace)
        await self.workers.stop()
        self.metrics.close()
        self.servicer.close()
        self.workers.close()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
