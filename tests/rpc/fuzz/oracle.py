"""The fuzz suite's oracle and bookkeeping: what every answer must be, the tally of cases and
status codes per RPC, and the liveness check made after each example."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vitlens.v1 import tensor_pb2, vitlens_pb2, vitlens_pb2_grpc

__all__ = [
    "CALL_TIMEOUT_S",
    "CLIENT_ERRORS",
    "EVALUATE_TIMEOUT_S",
    "MAX_DETAILS_CHARS",
    "TALLY",
    "Liveness",
    "Tally",
    "call_stream",
    "call_unary",
    "check_status",
    "send",
]

CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
MAX_DETAILS_CHARS = 1000
CALL_TIMEOUT_S = 30.0
EVALUATE_TIMEOUT_S = 15.0  # a slow valid run ends DEADLINE_EXCEEDED, which is allowed

SERVICE = "/vitlens.v1.VitlensService/"

# --------------------------------------------------------------------------- bookkeeping


@dataclass
class Tally:
    """Cases sent per RPC and the status codes they got, for the end-of-run report."""

    profile: str = ""
    codes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    seconds: Counter[str] = field(default_factory=Counter)
    liveness_checks: int = 0

    def record(self, rpc: str, code: grpc.StatusCode, seconds: float) -> None:
        self.codes[rpc][code.name] += 1
        self.seconds[rpc] += seconds

    def lines(self) -> list[str]:
        out = [f"profile {self.profile}; {self.liveness_checks} liveness checks passed"]
        for rpc in sorted(self.codes):
            codes = self.codes[rpc]
            seen = ", ".join(f"{code} {n}" for code, n in codes.most_common())
            out.append(f"{rpc}: {sum(codes.values())} cases in {self.seconds[rpc]:.1f} s — {seen}")
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "liveness_checks": self.liveness_checks,
            "rpcs": {
                rpc: {
                    "cases": sum(codes.values()),
                    "seconds": round(self.seconds[rpc], 2),
                    "codes": dict(codes.most_common()),
                }
                for rpc, codes in sorted(self.codes.items())
            },
        }


TALLY = Tally()


def check_status(rpc: str, code: grpc.StatusCode, details: str | None, seconds: float) -> None:
    """The oracle: OK, or a client error with a short message. Every answer is counted first,
    the forbidden ones included."""
    TALLY.record(rpc, code, seconds)
    if code is grpc.StatusCode.OK:
        return
    if code not in CLIENT_ERRORS:
        raise AssertionError(f"{rpc} answered {code.name}: {details!r}")
    if not details:
        raise AssertionError(f"{rpc} answered {code.name} with an empty message")
    if len(details) > MAX_DETAILS_CHARS:
        raise AssertionError(
            f"{rpc} answered {code.name} with a {len(details):,}-character message: "
            f"{details[:200]!r}…"
        )


def call_unary(rpc: str, method: Callable[..., Any], request: Any, timeout_s: float) -> Any:
    """The response, or None after a checked error status."""
    return _call(rpc, lambda: method(request, timeout=timeout_s))


def call_stream(rpc: str, method: Callable[..., Any], request: Any, timeout_s: float) -> Any:
    """Every message of the stream, read to its end, or None after a checked error status."""
    return _call(rpc, lambda: list(method(request, timeout=timeout_s)))


def _call(rpc: str, send: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    try:
        answer, code, details = send(), grpc.StatusCode.OK, None
    except grpc.RpcError as err:
        answer, code, details = None, err.code(), err.details()
    # Checked outside the `except`: where in a stream gRPC raised is not part of the failure.
    check_status(rpc, code, details, time.perf_counter() - started)
    return answer


def send(channel: grpc.Channel, rpc: str, request: Message | bytes, label: str) -> None:
    """``request`` to ``rpc`` as it is (bytes go on the wire unchanged), its answer checked;
    an Evaluate stream is read to its end."""
    serialize = None if isinstance(request, bytes) else type(request).SerializeToString
    if rpc == "Evaluate":
        method = channel.unary_stream(SERVICE + rpc, request_serializer=serialize)
        call_stream(label, method, request, EVALUATE_TIMEOUT_S)
    else:
        method = channel.unary_unary(SERVICE + rpc, request_serializer=serialize)
        call_unary(label, method, request, CALL_TIMEOUT_S)


class Liveness:
    """After an example: health SERVING, and a good Explain of an image never sent before (a
    cached answer would not prove the worker still runs)."""

    def __init__(self, channel: grpc.Channel, model: str) -> None:
        self._model = model
        self._health = health_pb2_grpc.HealthStub(channel)
        self._stub = vitlens_pb2_grpc.VitlensServiceStub(channel)
        self._count = 0
        self._lost: str | None = None  # why the server stopped answering, once it has

    def require(self) -> None:
        """Before an example: fail at once if an earlier one lost the server (each later
        example would otherwise wait out its deadline, for the whole of the shrinking phase)."""
        if self._lost is not None:
            pytest.fail(f"the server stopped answering in an earlier example ({self._lost})")

    def check(self) -> None:
        self.require()
        self._count += 1
        status = self._health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, f"health answered {status}"
        pixels = np.zeros((8, 8, 3), dtype=np.uint8)
        pixels[0, 0] = (self._count % 256, self._count // 256 % 256, self._count // 65536 % 256)
        request = vitlens_pb2.ExplainRequest(
            model=self._model,
            method="generic",
            images=[
                tensor_pb2.Image(
                    pixels=tensor_pb2.Tensor(
                        dtype=tensor_pb2.DTYPE_UINT8, shape=pixels.shape, data=pixels.tobytes()
                    )
                )
            ],
        )
        try:
            reply = self._stub.Explain(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            self._lost = f"{err.code().name}: {err.details()!r}"
            pytest.fail(f"after the example, a good Explain failed: {self._lost}")
        assert len(reply.results) == 1 and len(reply.results[0].explanations) == 1
        TALLY.liveness_checks += 1
