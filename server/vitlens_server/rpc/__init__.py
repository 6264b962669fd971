"""The gRPC face of the server: decode → runtime → encode. The only package importing grpc."""

from vitlens_server.rpc.server import VitlensServer

__all__ = ["VitlensServer"]
