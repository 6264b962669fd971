"""Typed errors raised by the SDK, one class per gRPC status the service uses.

Every `grpc.RpcError` coming out of a call is turned into one of these by `from_rpc_error`, so
callers can write ``except vitlens.NotFoundError`` instead of comparing status codes.
"""

from __future__ import annotations

import grpc

__all__ = [
    "CancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "VitlensError",
    "from_rpc_error",
]


class VitlensError(Exception):
    """A failed vitlens call.

    Attributes:
        code: the gRPC status of the failure.
        details: the server's (or gRPC's) human-readable message.
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.details: str = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if self.details else self.code.name

    def __reduce__(self) -> tuple[object, ...]:
        # Keep `code` when pickled (e.g. across processes); Exception only keeps `args`.
        return (type(self), (self.details,), {"code": self.code})


class InvalidArgumentError(VitlensError):
    """The request is wrong: bad image, unknown method or parameter, class out of range."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(VitlensError):
    """A named resource (a model) does not exist on the server."""

    default_code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(VitlensError):
    """The request is valid but the server cannot serve it in its current state."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(VitlensError):
    """A limit was hit: queue full, too many images, message too large."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(VitlensError):
    """The call did not finish before its deadline (``timeout_s``)."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(VitlensError):
    """The server cannot be reached or is not ready."""

    default_code = grpc.StatusCode.UNAVAILABLE


class UnimplementedError(VitlensError):
    """The RPC or feature is not available on this server."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


class PermissionDeniedError(VitlensError):
    """The caller is not allowed to do this (e.g. a dataset path outside the allowed roots)."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(VitlensError):
    """The call carried no valid credentials."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class CancelledError(VitlensError):
    """The call was cancelled (by the caller or the server)."""

    default_code = grpc.StatusCode.CANCELLED


class InternalError(VitlensError):
    """The server failed unexpectedly; its log has the details."""

    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[VitlensError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        ResourceExhaustedError,
        DeadlineExceededError,
        UnavailableError,
        UnimplementedError,
        PermissionDeniedError,
        UnauthenticatedError,
        CancelledError,
        InternalError,
    )
}


def from_rpc_error(err: grpc.RpcError) -> VitlensError:
    """The typed error for a failed call; codes without a class give a plain `VitlensError`.

    ``err`` is normally a `grpc.Call` (sync) or `grpc.aio.AioRpcError`, both of which have
    ``code()`` and ``details()``; a bare `grpc.RpcError` maps to UNKNOWN.
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    cls = _BY_CODE.get(code, VitlensError)
    return cls(details or "", code=code)
