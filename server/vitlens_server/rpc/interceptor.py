"""The one place where exceptions become gRPC statuses, for unary and streaming calls alike.

For every call of the Vitlens service and of the Open Inference Protocol's
GRPCInferenceService (`rpc.oip`), `CallInterceptor`:

- stamps a request id — the caller's ``x-request-id`` metadata (first 64 characters) or a fresh
  one — into the logs (`logs.request_id`) and echoes it in the trailing metadata;
- maps a `VitlensError` to its status and message, with the structured details of the gRPC
  convention (`rpc.details`; a ``retry_after_s`` also becomes the ``grpc-retry-pushback-ms``
  trailer); anything else becomes INTERNAL with a generic message naming an incident id, and
  the traceback is logged under that id;
- counts the call in ``vitlens_in_flight_requests``, ``vitlens_requests_total`` (by rpc,
  method and status code) and ``vitlens_request_seconds``. The rpc label is the method name
  for vitlens.v1 (``Explain``) and ``inference.<name>`` for the inference protocol
  (``inference.ModelInfer``); the method label is the explanation method of an Explain call or
  of an explaining ModelInfer, empty otherwise.

Health and reflection calls pass through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from vitlens_server.errors import InvalidArgument, ResourceExhausted, VitlensError
from vitlens_server.logs import request_id
from vitlens_server.rpc import oip
from vitlens_server.rpc.details import STATUS_DETAILS_KEY, status_details
from vitlens_server.rpc.oip.convert import explain_method
from vitlens_server.telemetry import Telemetry

__all__ = ["CallInterceptor"]

log = logging.getLogger("vitlens.rpc")

SERVICE_PREFIX = "/vitlens.v1.VitlensService/"


def _vitlens_method(rpc: str, request: Any) -> str | None:
    return (getattr(request, "method", "") or "") if rpc == "Explain" else None


def _oip_method(rpc: str, request: Any) -> str | None:
    return explain_method(request) if rpc == "ModelInfer" else None


@dataclass(frozen=True)
class _Service:
    """How the interceptor treats the calls of one service."""

    prefix: str  # of its call paths, "/package.Service/"
    label: str  # put before the method name in the rpc label
    protos: str  # where a caller finds the request types (malformed-message errors)
    smaller: str  # how to ask for a smaller answer
    # the explanation method a request names ("" for the default), None when it explains nothing
    explains: Callable[[str, Any], str | None]


_SERVICES = (
    _Service(
        SERVICE_PREFIX,
        "",
        "protos/vitlens/v1",
        "send fewer images per request, or ask for float16 output, the token grid or no "
        "relevance matrices",
        _vitlens_method,
    ),
    _Service(
        oip.SERVICE_PREFIX,
        "inference.",
        "protos/inference",
        "send fewer images per request, or ask for fewer outputs (RELEVANCE is the largest) "
        "or the token grid",
        _oip_method,
    ),
)


@dataclass
class _Call:
    rpc: str
    method: str  # the explanation method of an Explain call, for the metrics label
    id: str
    started: float
    code: str = "OK"


Parse = Callable[[bytes], Any] | None


def _parsed(rpc: str, parse: Parse, data: bytes, service: _Service) -> Any:
    """The request message of ``data``; INVALID_ARGUMENT when the bytes do not parse."""
    if parse is None:
        return data
    try:
        return parse(data)
    except DecodeError as err:
        raise InvalidArgument(
            f"the {rpc} request is not a valid protobuf message of its type ({err}); "
            f"build it from {service.protos}"
        ) from None


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Error mapping, request ids and request metrics around every handler of the Vitlens service
    and of the inference protocol.

    Args:
        telemetry: where the request metrics go (None: not recorded).
        method_names: registered explanation methods; other names are labelled ``unknown``
            (label values stay bounded whatever callers send).
        default_method: the label of an Explain call that names no method.
        max_reply_bytes: the server's send limit: a larger reply is refused here, with a
            message saying how to ask for less, instead of failing inside gRPC.

    Requests arrive as bytes and are parsed here, so a malformed message is INVALID_ARGUMENT
    rather than an error inside gRPC.
    """

    def __init__(
        self,
        telemetry: Telemetry | None,
        method_names: frozenset[str],
        default_method: str,
        max_reply_bytes: int | None = None,
    ) -> None:
        self._telemetry = telemetry
        self._methods = method_names
        self._default_method = default_method
        self._max_reply_bytes = max_reply_bytes

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]], details
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        service = next((s for s in _SERVICES if details.method.startswith(s.prefix)), None)
        if handler is None or service is None:
            return handler
        rpc = details.method.removeprefix(service.prefix)
        parse = handler.request_deserializer
        kwargs = {"request_deserializer": None, "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(service, rpc, parse, handler.unary_unary), **kwargs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(service, rpc, parse, handler.unary_stream), **kwargs
            )
        return handler  # neither service has client-streaming RPCs

    def _unary(
        self, service: _Service, rpc: str, parse: Parse, behaviour: Callable[..., Awaitable[Any]]
    ):
        label = service.label + rpc

        async def unary(data: bytes, context: grpc.aio.ServicerContext) -> Any:
            call, token = self._begin(label, context)
            try:
                request = _parsed(label, parse, data, service)
                call.method = self._method_label(service.explains(rpc, request))
                return self._checked(await behaviour(request, context), service)
            except BaseException as err:
                await self._fail(call, err, context)
                raise
            finally:
                self._end(call, token)

        return unary

    def _stream(
        self, service: _Service, rpc: str, parse: Parse, behaviour: Callable[..., AsyncIterator]
    ):
        label = service.label + rpc

        async def stream(data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call, token = self._begin(label, context)
            try:
                request = _parsed(label, parse, data, service)
                call.method = self._method_label(service.explains(rpc, request))
                async for message in behaviour(request, context):
                    yield self._checked(message, service)
            except BaseException as err:
                await self._fail(call, err, context)
                raise
            finally:
                self._end(call, token)

        return stream

    def _checked(self, reply: Any, service: _Service) -> Any:
        """``reply``, unless it is over the send limit (RESOURCE_EXHAUSTED saying why)."""
        limit = self._max_reply_bytes
        if limit is not None and (size := reply.ByteSize()) > limit:
            raise ResourceExhausted(
                f"the answer would be {size:,} bytes, over this server's message limit of "
                f"{limit:,}; {service.smaller}"
            )
        return reply

    def _begin(self, rpc: str, context: grpc.aio.ServicerContext):
        given = dict(context.invocation_metadata() or ()).get("x-request-id", "")
        call_id = given[:64] if given else uuid.uuid4().hex[:16]
        context.set_trailing_metadata((("x-request-id", call_id),))
        call = _Call(rpc, "", call_id, time.perf_counter())
        if self._telemetry is not None:
            self._telemetry.in_flight.labels(rpc).inc()
        return call, request_id.set(call_id)

    async def _fail(
        self, call: _Call, err: BaseException, context: grpc.aio.ServicerContext
    ) -> None:
        """Abort the call with ``err``'s status; `context.abort` raises, ending the handler.

        Cancellation (the caller left) and aborts already made pass through."""
        if isinstance(err, asyncio.CancelledError | GeneratorExit):
            call.code = "CANCELLED"
            return
        if isinstance(err, grpc.aio.AbortError):
            call.code = context.code().name if context.code() is not None else "UNKNOWN"
            return
        if isinstance(err, VitlensError):
            call.code = err.status
            code = grpc.StatusCode[err.status]
            trailers = [("x-request-id", call.id)]
            if err.retry_after_s is not None:
                trailers.append(("grpc-retry-pushback-ms", str(round(err.retry_after_s * 1000))))
            trailers.append((STATUS_DETAILS_KEY, status_details(err, code).SerializeToString()))
            context.set_trailing_metadata(tuple(trailers))
            await context.abort(code, str(err))
        call.code = "INTERNAL"
        incident = uuid.uuid4().hex[:12]
        log.error("%s failed (incident %s)", call.rpc, incident, exc_info=err)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal server error (incident {incident}); the server log has the details",
        )

    def _end(self, call: _Call, token: contextvars.Token) -> None:
        with contextlib.suppress(ValueError):  # a stream closed from another context
            request_id.reset(token)
        if self._telemetry is not None:
            t = self._telemetry
            t.in_flight.labels(call.rpc).dec()
            t.requests.labels(call.rpc, call.method, call.code).inc()
            t.latency.labels(call.rpc, call.method).observe(time.perf_counter() - call.started)

    def _method_label(self, method: str | None) -> str:
        """The metrics label of a call explaining with ``method`` (None: explaining nothing)."""
        if method is None:
            return ""
        name = method or self._default_method
        return name if name in self._methods else "unknown"
