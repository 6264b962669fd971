"""The one place where exceptions become gRPC statuses."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from vitlens_server.errors import VitlensError
from vitlens_server.explain import METHODS
from vitlens_server.logs import request_id

__all__ = ["map_errors"]

log = logging.getLogger("vitlens.rpc")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def map_errors(handler: F) -> F:
    """Abort with the domain error's status; anything unexpected becomes a logged INTERNAL.

    Also counts the call, its status and latency in the servicer's ``metrics`` (if it has any).
    """
    rpc = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metrics = getattr(self, "metrics", None)
        method = _method_label(rpc, request)
        given = dict(context.invocation_metadata() or ()).get("x-request-id", "")
        call_id = given[:64] if given else uuid.uuid4().hex[:16]
        token = request_id.set(call_id)
        context.set_trailing_metadata((("x-request-id", call_id),))
        started = time.perf_counter()
        code = "OK"
        if metrics is not None:
            metrics.in_flight.labels(rpc).inc()
        try:
            return await handler(self, request, context)
        except VitlensError as err:
            code = err.status
            retry_after_s = getattr(err, "retry_after_s", None)
            if retry_after_s is not None:
                context.set_trailing_metadata(
                    (
                        ("x-request-id", call_id),
                        ("grpc-retry-pushback-ms", str(round(retry_after_s * 1000))),
                    )
                )
            await context.abort(grpc.StatusCode[err.status], str(err))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            incident = uuid.uuid4().hex[:12]
            log.exception("%s failed (incident %s)", rpc, incident)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal server error (incident {incident}); the server log has the details",
            )
        finally:
            request_id.reset(token)
            if metrics is not None:
                metrics.in_flight.labels(rpc).dec()
                metrics.requests.labels(rpc, method, code).inc()
                metrics.latency.labels(rpc, method).observe(time.perf_counter() - started)

    return wrapper  # type: ignore[return-value]


def _method_label(rpc: str, request: Any) -> str:
    """The explanation method of an Explain call, bounded to registered names for metrics."""
    if rpc != "Explain":
        return ""
    name = getattr(request, "method", "") or "generic"
    return name if name in METHODS else "unknown"
