"""The Open Inference Protocol (KServe v2 / Triton gRPC), served beside vitlens.v1.

    grpc_service_pb2   the protocol's messages, generated from protos/inference/
                       (scripts/gen_oip_protos.sh)
    service            the service's handlers and client stub, built from its descriptor
    tensors            protocol tensors ↔ numpy (raw little-endian bytes or typed contents)
    convert            ModelInfer ↔ the data plane's queries and replies; model metadata
    servicer           decode → data plane → encode

The model's tensors and parameters are documented in docs/oip.md.
"""

from vitlens_server.rpc.oip.service import (
    SERVICE_NAME,
    SERVICE_PREFIX,
    Stub,
    generic_handler,
)
from vitlens_server.rpc.oip.servicer import OipServicer, health_readiness

__all__ = [
    "SERVICE_NAME",
    "SERVICE_PREFIX",
    "OipServicer",
    "Stub",
    "generic_handler",
    "health_readiness",
]
