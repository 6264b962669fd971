"""Domain errors. Each class names the gRPC status it maps to; only `rpc` imports grpc.

Raise these from anywhere below the RPC layer with a message that tells the caller what to fix.
Anything else escaping a handler becomes INTERNAL with a generic message and a logged traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = [
    "ECHO_CHARS",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "VitlensError",
    "about",
    "clip",
    "cut",
]

ECHO_CHARS = 200  # the most of any client string an error message repeats


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` for an error message (quoted, control characters and lone surrogates
    escaped), cut to ``limit`` characters, so a huge client string can neither flood the
    reply's metadata nor the log."""
    return cut(repr(value), limit)


def cut(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters, the last one an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def about(field: str) -> Iterator[None]:
    """Domain errors raised inside name ``field`` as the request field at fault, unless they
    name a more precise one already."""
    try:
        yield
    except VitlensError as err:
        if err.field is None:
            err.field = field
        raise


class VitlensError(Exception):
    """Base class; `status` is a `grpc.StatusCode` member name.

    Besides the message, an error may say what it is about, for the structured details of the
    gRPC status (``google.rpc.BadRequest``, ``ResourceInfo``, ``RetryInfo``):

    Attributes:
        field: the request field at fault, as a path (``options.method_options.steps``).
        resource: (type, name) of a resource that does not exist or may not be used.
        retry_after_s: when the caller may retry, or None when retrying will not help.
    """

    status: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        resource: tuple[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        self.resource = resource
        self.retry_after_s = retry_after_s


class InvalidArgument(VitlensError):
    """The request itself is wrong (bad image, unknown method, class out of range...)."""

    status = "INVALID_ARGUMENT"


class NotFound(VitlensError):
    """A named resource (model) does not exist."""

    status = "NOT_FOUND"


class PermissionDenied(VitlensError):
    """The request names something the operator did not allow (a path outside dataset roots)."""

    status = "PERMISSION_DENIED"


class Unauthenticated(VitlensError):
    """The call carries no valid credentials (bearer token)."""

    status = "UNAUTHENTICATED"


class FailedPrecondition(VitlensError):
    """The request is valid but the server is not in a state to serve it."""

    status = "FAILED_PRECONDITION"


class ResourceExhausted(VitlensError):
    """A limit was hit (queue full, out of device memory for a single request); its
    ``retry_after_s`` travels as the ``grpc-retry-pushback-ms`` trailer and a ``RetryInfo``."""

    status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(VitlensError):
    """The caller's deadline passed before the work could start."""

    status = "DEADLINE_EXCEEDED"


class Unavailable(VitlensError):
    """The server cannot take the request now (shutting down); another replica can."""

    status = "UNAVAILABLE"


class Unimplemented(VitlensError):
    """The RPC or feature is declared but not available yet."""

    status = "UNIMPLEMENTED"
