"""Domain errors. Each class names the gRPC status it maps to; only `rpc` imports grpc.

Raise these from anywhere below the RPC layer with a message that tells the caller what to fix.
Anything else escaping a handler becomes INTERNAL with a generic message and a logged traceback.
"""

from __future__ import annotations

__all__ = [
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
]


class VitlensError(Exception):
    """Base class; `status` is a `grpc.StatusCode` member name."""

    status: str = "INTERNAL"


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
    """A limit was hit (queue full, out of device memory for a single request).

    ``retry_after_s``: when the caller may retry (sent as the ``grpc-retry-pushback-ms``
    trailer, which gRPC retry policies honour), or None when retrying will not help.
    """

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(VitlensError):
    """The caller's deadline passed before the work could start."""

    status = "DEADLINE_EXCEEDED"


class Unavailable(VitlensError):
    """The server cannot take the request now (shutting down); another replica can."""

    status = "UNAVAILABLE"


class Unimplemented(VitlensError):
    """The RPC or feature is declared but not available yet."""

    status = "UNIMPLEMENTED"
