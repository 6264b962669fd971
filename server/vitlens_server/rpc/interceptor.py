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

from vitlens_server.errors import VitlensError
from vitlens_server.logs import request_id
from vitlens_server.rpc.details import STATUS_DETAILS_KEY, status_details
from vitlens_server.telemetry import Telemetry

__all__ = ["CallInterceptor"]

log = logging.getLogger("vitlens.rpc")

SERVICE_PREFIX = "/vitlens.v1.Vitlens/"


@dataclass
class _Call:
    rpc: str
    method: str  # the explanation method of an Explain call, for the metrics label
    id: str
    started: float
    code: str = "OK"


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Error mapping, request ids and request metrics around every Vitlens handler.

    Args:
        telemetry: where the request metrics go (None: not recorded).
        method_names: registered explanation methods; other names are labelled ``unknown``
            (label values stay bounded whatever callers send).
        default_method: the label of an Explain call that names no method.
    """

    def __init__(
        self, telemetry: Telemetry | None, method_names: frozenset[str], default_method: str
    ) -> None:
        self._telemetry = telemetry
        self._methods = method_names
        self._default_method = default_method

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]], details
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        rpc = details.method.removeprefix(SERVICE_PREFIX)
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(rpc, handler.unary_unary), **kwargs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(rpc, handler.unary_stream), **kwargs
            )
        return handler  # the service has no client-streaming RPCs

    def _unary(self, rpc: str, behaviour: Callable[..., Awaitable[Any]]):
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call, token = self._begin(rpc, request, context)
            try:
                return await behaviour(request, context)
            except BaseException as err:
                await self._fail(call, err, context)
                raise
            finally:
                self._end(call, token)

        return unary

    def _stream(self, rpc: str, behaviour: Callable[..., AsyncIterator[Any]]):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call, token = self._begin(rpc, request, context)
            try:
                async for message in behaviour(request, context):
                    yield message
            except BaseException as err:
                await self._fail(call, err, context)
                raise
            finally:
                self._end(call, token)

        return stream

    def _begin(self, rpc: str, request: Any, context: grpc.aio.ServicerContext):
        given = dict(context.invocation_metadata() or ()).get("x-request-id", "")
        call_id = given[:64] if given else uuid.uuid4().hex[:16]
        context.set_trailing_metadata((("x-request-id", call_id),))
        call = _Call(rpc, self._method_label(rpc, request), call_id, time.perf_counter())
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
