#!/usr/bin/env bash
# Regenerate the server's Open Inference Protocol messages from protos/inference/.
# tests/unit/test_oip_protos.py checks that running this changes nothing.
#
# Only the message modules are generated: they import nothing but google.protobuf, so they
# live inside vitlens_server as they are. protoc's gRPC plugin would emit
# `from inference import grpc_service_pb2`, a top-level package vitlens does not have; the
# service's handlers and client stub are built from the descriptor instead
# (server/vitlens_server/rpc/oip/service.py).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/server/vitlens_server/rpc/oip}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python -m grpc_tools.protoc -I"$root/protos" \
  --python_out="$tmp" --pyi_out="$tmp" \
  "$root/protos/inference/grpc_service.proto"
mkdir -p "$out"
cp "$tmp/inference/grpc_service_pb2.py" "$tmp/inference/grpc_service_pb2.pyi" "$out/"
