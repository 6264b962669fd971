"""The GRPCInferenceService's server handlers and client stub, built from its descriptor.

protoc's gRPC plugin would write these as ``grpc_service_pb2_grpc.py``, importing
``from inference import grpc_service_pb2``, a top-level package that does not exist inside
vitlens_server. Every RPC of the service is unary, so one loop over the descriptor's methods
gives both sides, and they can never drift from the proto.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message_factory

from vitlens_server.rpc.oip import grpc_service_pb2 as pb

__all__ = ["SERVICE_NAME", "SERVICE_PREFIX", "Stub", "generic_handler"]

_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = _SERVICE.full_name  # "inference.GRPCInferenceService"
SERVICE_PREFIX = f"/{SERVICE_NAME}/"

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _types(method) -> tuple[type, type]:
    return (
        message_factory.GetMessageClass(method.input_type),
        message_factory.GetMessageClass(method.output_type),
    )


def generic_handler(servicer: object) -> grpc.GenericRpcHandler:
    """The service's handlers: each RPC calls the servicer's coroutine method of its name."""
    handlers = {}
    for method in _SERVICE.methods:
        request, _reply = _types(method)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=request.FromString,
            response_serializer=lambda reply: reply.SerializeToString(),
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class Stub:
    """A client of the service on ``channel`` (sync or aio): ``Stub(channel).ModelInfer(...)``."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        for method in _SERVICE.methods:
            request, reply = _types(method)
            call = channel.unary_unary(
                f"{SERVICE_PREFIX}{method.name}",
                request_serializer=request.SerializeToString,
                response_deserializer=reply.FromString,
            )
            setattr(self, method.name, call)
