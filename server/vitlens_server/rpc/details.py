"""Structured error details in the gRPC convention: a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer (what `grpc_status.rpc_status.from_call` reads).

    field         → google.rpc.BadRequest with one FieldViolation(field, description)
    resource      → google.rpc.ResourceInfo(resource_type, resource_name, description)
    retry_after_s → google.rpc.RetryInfo(retry_delay)
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from vitlens_server.errors import VitlensError

__all__ = ["STATUS_DETAILS_KEY", "status_details"]

STATUS_DETAILS_KEY = "grpc-status-details-bin"


def status_details(err: VitlensError, code: grpc.StatusCode) -> status_pb2.Status:
    """The ``google.rpc.Status`` of ``err`` answered with ``code``."""
    details = []
    message = str(err)
    if err.field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=err.field, description=message
        )
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if err.resource is not None:
        kind, name = err.resource
        details.append(
            error_details_pb2.ResourceInfo(
                resource_type=kind, resource_name=name, description=message
            )
        )
    if err.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(round(err.retry_after_s * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)
