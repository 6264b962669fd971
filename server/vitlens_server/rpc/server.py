"""The grpc.aio server around a data plane: the Vitlens service, the Open Inference Protocol
(KServe v2 / Triton gRPC), grpc.health.v1, reflection."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vitlens.v1 import vitlens_pb2, vitlens_pb2_grpc
from vitlens_server.config import ServerConfig
from vitlens_server.rpc import oip
from vitlens_server.rpc.interceptor import CallInterceptor
from vitlens_server.rpc.security import BearerTokenAuth, server_credentials
from vitlens_server.rpc.servicer import VitlensServicer
from vitlens_server.runtime.api import DataPlaneApi
from vitlens_server.telemetry import Telemetry

__all__ = ["SERVICE_NAME", "build_server"]

SERVICE_NAME = vitlens_pb2.DESCRIPTOR.services_by_name["VitlensService"].full_name

# grpc.aio's core logs here, at ERROR with a traceback, when a reply cannot be sent.
GRPC_CORE_LOGGER = "grpc._cython.cygrpc"


class CallerGoneFilter(logging.Filter):
    """grpc.aio logs ``ExecuteBatchError raised in core`` at ERROR, with a traceback, when a
    reply cannot be sent because the caller already ended the call: it cancelled, passed its
    deadline, or reset the stream after its receive limit refused the reply (grpc-js does).
    That is the caller's doing, not a server fault: it becomes one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if type(error).__name__ == "ExecuteBatchError" and record.levelno >= logging.ERROR:
            method = record.getMessage().rpartition(" ")[2]  # [/package.Service/Method]
            record.msg, record.args = (
                "the caller ended the call %s before its reply was sent",
                (method,),
            )
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


def _quiet_callers_gone() -> None:
    logger = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(f, CallerGoneFilter) for f in logger.filters):
        logger.addFilter(CallerGoneFilter())


def build_server(
    config: ServerConfig,
    plane: DataPlaneApi,
    health_servicer: health.aio.HealthServicer,
    telemetry: Telemetry | None = None,
    default_method: str = "generic",
    outer_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server bound to ``config.host:config.port`` (not started); returns it and the
    bound port. Call from the event loop that will run it (grpc.aio binds to it).

    ``outer_interceptors`` wrap everything else, in order (tracing: the server span covers the
    whole call, its error mapping included)."""
    _quiet_callers_gone()
    limit = config.max_message_bytes
    # The first interceptor is the outermost: the authentication refusal is mapped, counted and
    # stamped with a request id like any other error.
    interceptors: list[grpc.aio.ServerInterceptor] = [
        *outer_interceptors,
        CallInterceptor(telemetry, plane.method_names, default_method, limit),
    ]
    if config.auth_tokens:
        interceptors.append(BearerTokenAuth(config.auth_tokens))
    server = grpc.aio.server(
        interceptors=interceptors,
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
    vitlens_pb2_grpc.add_VitlensServiceServicer_to_server(VitlensServicer(plane), server)
    # The same data plane through the Open Inference Protocol, ready when vitlens.v1 is.
    ready = oip.health_readiness(health_servicer, SERVICE_NAME)
    server.add_generic_rpc_handlers(
        (oip.generic_handler(oip.OipServicer(plane, ready, default_method)),)
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, oip.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{config.host}:{config.port}"
    if config.tls_cert is not None:
        credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port
