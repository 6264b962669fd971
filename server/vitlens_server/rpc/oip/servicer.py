"""The Open Inference Protocol servicer: decode → await the data plane → encode.

Like `rpc.servicer.VitlensServicer`, it raises `VitlensError`s and leaves statuses, request ids
and metrics to the one interceptor (`rpc.interceptor.CallInterceptor`). Readiness is the
readiness the Kubernetes probe sees: the health status of the vitlens service, SERVING once
every model is loaded and warmed up, NOT_SERVING again while the server drains.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2

from vitlens_server import __version__
from vitlens_server.errors import InvalidArgument, NotFound, VitlensError, clip
from vitlens_server.rpc.oip import convert
from vitlens_server.rpc.oip import grpc_service_pb2 as pb
from vitlens_server.runtime.api import DataPlaneApi, ModelCard

__all__ = ["OipServicer", "health_readiness"]

SERVER_NAME = "vitlens"

Readiness = Callable[[], Awaitable[bool]]


class OipServicer:
    """GRPCInferenceService over the data plane; register it with `service.generic_handler`.

    Args:
        plane: the data plane every inference goes through.
        ready: whether the server takes requests now (`health_readiness`).
        default_method: the method of a request that explains without naming one.
    """

    def __init__(self, plane: DataPlaneApi, ready: Readiness, default_method: str) -> None:
        self._plane = plane
        self._ready = ready
        self._default_method = default_method

    async def ServerLive(self, request, context: grpc.aio.ServicerContext):
        return pb.ServerLiveResponse(live=True)  # answering at all is being live

    async def ServerReady(self, request, context: grpc.aio.ServicerContext):
        return pb.ServerReadyResponse(ready=await self._ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext):
        self._card(request.name, request.version)  # NOT_FOUND for an unknown model
        return pb.ModelReadyResponse(ready=await self._ready())

    async def ServerMetadata(self, request, context: grpc.aio.ServicerContext):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ):
        return convert.model_metadata(self._card(request.name, request.version))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext):
        card = self._card(request.model_name, request.model_version)
        inf = convert.inference(request)
        classes = len(card.labels)
        deadline = _deadline(context)
        with _protocol_fields():
            if inf.explain:
                self._check_relevance(card, inf)
                reply = await self._plane.explain(convert.explain_query(inf, classes, deadline))
            else:
                reply = await self._plane.predict(convert.predict_query(inf, classes, deadline))
        return convert.infer_response(request, inf, reply, classes)

    def _card(self, name: str, version: str) -> ModelCard:
        card = self._plane.model(name)  # NOT_FOUND names the models
        if version not in ("", convert.VERSION):
            raise NotFound(
                f"model {card.name!r} has no version {clip(version, 60)}; it has version "
                f"{convert.VERSION} (or leave the version empty)",
                resource=("model version", f"{card.name}/{version[:60]}"),
            )
        return card

    def _check_relevance(self, card: ModelCard, inf: convert.Inference) -> None:
        """RELEVANCE asked of a method without a token relevance matrix, refused in this
        protocol's words (unknown methods are the data plane's to name)."""
        if "RELEVANCE" not in inf.outputs:
            return
        name = inf.method or self._default_method
        methods = {m.name: m for m in card.methods}
        if name in methods and not methods[name].relevance_matrix:
            with_matrix = ", ".join(m.name for m in card.methods if m.relevance_matrix)
            raise InvalidArgument(
                f"method {name!r} has no token relevance matrix, so it cannot answer output "
                f"RELEVANCE; drop RELEVANCE from the outputs or use one of: {with_matrix}",
                field="outputs",
            )


def health_readiness(servicer: health.aio.HealthServicer, service: str) -> Readiness:
    """Whether ``servicer`` reports ``service`` SERVING (unknown services are not ready)."""
    request = health_pb2.HealthCheckRequest(service=service)

    async def ready() -> bool:
        try:
            reply = await servicer.Check(request, _Probe())
        except LookupError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    return ready


class _Probe:
    """The context of an in-process health check: its only use, abort, means unknown."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise LookupError(details or code.name)


_OPTIONS = "options.method_options"


@contextlib.contextmanager
def _protocol_fields() -> Iterator[None]:
    """Errors from the data plane name the request fields of this protocol."""
    try:
        yield
    except VitlensError as err:
        if err.field is not None:
            err.field = _protocol_field(err.field)
        raise


def _protocol_field(field: str) -> str:
    """A vitlens.v1 request field as this protocol names it (``options.method_options.steps``
    → ``parameters[option.steps]``)."""
    if field.startswith(f"{_OPTIONS}."):
        return f"parameters[{convert.OPTION}{field.removeprefix(f'{_OPTIONS}.')}]"
    if field == _OPTIONS:
        return "parameters"
    if field == "method" or field.split(".")[0] == "target":
        return f"parameters[{field.split('.')[0]}]"
    if field.startswith(f"{convert.INPUT}["):  # IMAGE[3].pixels: the image, as sent
        return field.split(".")[0]
    return "inputs" if field == "images" else field


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a `time.monotonic` instant (None: the caller set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
