"""The one place where exceptions become gRPC statuses."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from vitlens_server.errors import VitlensError

__all__ = ["map_errors"]

log = logging.getLogger("vitlens.rpc")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def map_errors(handler: F) -> F:
    """Abort with the domain error's status; anything unexpected becomes a logged INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except VitlensError as err:
            retry_after_s = getattr(err, "retry_after_s", None)
            if retry_after_s is not None:
                context.set_trailing_metadata(
                    (("grpc-retry-pushback-ms", str(round(retry_after_s * 1000))),)
                )
            await context.abort(grpc.StatusCode[err.status], str(err))
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("%s failed (incident %s)", handler.__name__, incident)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal server error (incident {incident}); the server log has the details",
            )

    return wrapper  # type: ignore[return-value]
