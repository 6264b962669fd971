"""The wire shape of a GRPCInferenceService: every RPC's path and types, every field's number,
type, cardinality and oneof, of every message the RPCs reach (nested ones included).

Imported by tests/unit/test_oip_protos.py for the server's own descriptor, and run as a script
in build/oip-venv for tritonclient's, so the two can be compared as JSON:

    build/oip-venv/bin/python tests/rpc/oip_client/descriptors.py ServerLive ModelInfer ...
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["describe"]


def describe(service: Any, methods: list[str]) -> dict[str, Any]:
    """``methods`` of the ServiceDescriptor ``service`` and the messages they reach."""
    shape: dict[str, Any] = {"rpcs": {}, "messages": {}}
    for name in methods:
        method = service.methods_by_name[name]
        shape["rpcs"][f"/{service.full_name}/{name}"] = [
            method.input_type.full_name,
            method.output_type.full_name,
            method.client_streaming,
            method.server_streaming,
        ]
        _message(method.input_type, shape["messages"])
        _message(method.output_type, shape["messages"])
    return shape


def _message(message: Any, seen: dict[str, Any]) -> None:
    if message.full_name in seen:
        return
    seen[message.full_name] = {
        field.name: [
            field.number,
            field.type,
            field.is_repeated,
            field.message_type.full_name if field.message_type else "",
            field.containing_oneof.name if field.containing_oneof else "",
        ]
        for field in message.fields
    }
    for field in message.fields:
        if field.message_type is not None:
            _message(field.message_type, seen)


if __name__ == "__main__":
    from tritonclient.grpc import service_pb2

    triton = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    print(json.dumps(describe(triton, sys.argv[1:]), indent=1, sort_keys=True))
