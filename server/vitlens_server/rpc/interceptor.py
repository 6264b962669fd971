"""The one place where exceptions become gRPC statuses, for unary and streaming calls alike.

For every call of the Vitlens service `CallInterceptor`:

- stamps a request id — the caller's ``x-request-id`` metadata (first 64 characters) or a fresh
  one — into the logs (`logs.request_id`) and echoes it in the trailing metadata;
- maps a `VitlensError` to its status and message, with the structured details of the gRPC
  convention (`rpc.details`; a ``retry_after_s`` also becomes the ``grpc-retry-pushback-ms``
  trailer); anything else becomes INTERNAL with a generic message naming an incident id, and
  the traceback is logged under that id;
- counts the call in ``vitlens_in_flight_requests``, ``vitlens_requests_total`` (by rpc,
  method and status code) and ``vitlens_request_seconds``.

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
from vitlens_server.rpc.details import STATUS_DETAILS_KEY, status_details
from vitlens_server.telemetry import Telemetry

__all__ = ["CallInterceptor"]

log = logging.getLogger("vitlens.rpc")

SERVICE_PREFIX = "/vitlens.v1.VitlensService/"


@dataclass
class _Call:
    rpc: str
    method: str  # the explanation method of an Explain call, for the metrics label
    id: str
    started: float
    code: str = "OK"


Parse = Callable[[bytes], Any] | None


def _parsed(rpc: str, parse: Parse, data: bytes) -> Any:
    """The request message of ``data``; INVALID_ARGUMENT when the bytes do not parse."""
    if parse is None:
        return data
    try:
        return parse(data)
    except DecodeError as err:
        raise InvalidArgument(
            f"the {rpc} request is not a valid protobuf message of its type ({err}); "
            "build it from protos/vitlens/v1"
        ) from None


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Error mapping, request ids and request metrics around every Vitlens handler.

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
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        rpc = details.method.removeprefix(SERVICE_PREFIX)
        parse = handler.request_deserializer
        kwargs = {"request_deserializer": None, "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(rpc, parse, handler.unary_unary), **kwargs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(rpc, parse, handler.unary_stream), **kwargs
            )
        return handler  # the service has no client-streaming RPCs

    def _unary(self, rpc: str, parse: Parse, behaviour: Callable[..., Awaitable[Any]]):
        async def unary(data: bytes, context: grpc.aio.ServicerContext) -> Any:
            call, token = self._begin(rpc, context)
            try:
                request = _parsed(rpc, parse, data)
                call.method = self._method_label(rpc, request)
                return self._checked(await behaviour(request, context))
            except BaseException as err:
                await self._fail(call, err, context)
                raise
            finally:
                self._end(call, token)

        return unary

    def _stream(self, rpc: str, parse: Parse, behaviour: Callable[..., AsyncIterator[Any]]):
        async def stream(data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call, token = self._begin(rpc, context)
            try:
                request = _parsed(rpc, parse, data)
                call.method = self._method_label(rpc, request)
                async for message in behaviour(request, context):
                    yield self._checked(message)
            except BaseException as err:
                await self._fail(call, err, context)
                raise
            finally:
                self._end(call, token)

        return stream

    def _checked(self, reply: Any) -> Any:
        """``reply``, unless it is over the send limit (RESOURCE_EXHAUSTED saying why)."""
        limit = self._max_reply_bytes
        if limit is not None and (size := reply.ByteSize()) > limit:
            raise ResourceExhausted(
                f"the answer would be {size:,} bytes, over this server's message limit of "
                f"{limit:,}; send fewer images per request, or ask for float16 output, the "
                "token grid or no relevance matrices"
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

    def _method_label(self, rpc: str, request: Any) -> str:
        if rpc != "Explain":
            return ""
        name = getattr(request, "method", "") or self._default_method
        return name if name in self._methods else "unknown"
