"""Typed errors raised by the SDK, one class per gRPC status the service uses.

Every `grpc.RpcError` coming out of a call is turned into one of these by `from_rpc_error`, so
callers can write ``except vitlens.NotFoundError`` instead of comparing status codes. The
server's structured details (the ``google.rpc.Status`` in the ``grpc-status-details-bin``
trailer) come with it: the request fields at fault (``field_violations``), the resource
(``resource``) and when to retry (``retry_after_s``), plus the call's ``request_id``.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "CancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "Resource",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "VitlensError",
    "from_rpc_error",
]


@dataclass(frozen=True)
class FieldViolation:
    """A request field the server rejected: its path (``images[2].pixels``) and why."""

    field: str
    description: str


@dataclass(frozen=True)
class Resource:
    """A resource an error is about: its type (``model``) and name."""

    type: str
    name: str


class VitlensError(Exception):
    """A failed vitlens call.

    Attributes:
        code: the gRPC status of the failure.
        details: the server's (or gRPC's) human-readable message.
        field_violations: the request fields at fault, when the server named them.
        resource: the resource the error is about (an unknown model), if any.
        retry_after_s: when a retry may succeed (a full queue); None: retrying will not help.
        request_id: the call's ``x-request-id`` (to find its lines in the server's log).
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str = "",
        *,
        code: grpc.StatusCode | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        resource: Resource | None = None,
        retry_after_s: float | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(details)
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.details: str = details
        self.field_violations = field_violations
        self.resource = resource
        self.retry_after_s = retry_after_s
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if self.details else self.code.name

    def __reduce__(self) -> tuple[object, ...]:
        # Keep the attributes when pickled (e.g. across processes); Exception keeps `args`.
        return (type(self), (self.details,), dict(vars(self)))


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
    ``code()``, ``details()`` and ``trailing_metadata()``; a bare `grpc.RpcError` maps to
    UNKNOWN.
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    trailers_fn = getattr(err, "trailing_metadata", None)
    trailers = dict((trailers_fn() if callable(trailers_fn) else None) or ())
    cls = _BY_CODE.get(code, VitlensError)
    return cls(
        details or "",
        code=code,
        request_id=str(trailers.get("x-request-id", "")),
        **_structured(trailers.get("grpc-status-details-bin")),
    )


def _structured(blob: bytes | None) -> dict:
    """Field violations, resource and retry delay from a serialized ``google.rpc.Status``."""
    if not isinstance(blob, bytes):
        return {}
    try:
        status = status_pb2.Status.FromString(blob)
    except Exception:  # a malformed trailer: keep the plain error
        return {}
    out: dict = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            out["field_violations"] = tuple(
                FieldViolation(v.field, v.description) for v in request.field_violations
            )
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            info = error_details_pb2.ResourceInfo()
            detail.Unpack(info)
            out["resource"] = Resource(info.resource_type, info.resource_name)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out["retry_after_s"] = retry.retry_delay.ToMilliseconds() / 1000
    return out
