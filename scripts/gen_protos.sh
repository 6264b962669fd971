#!/usr/bin/env bash
# Regenerate the committed protobuf/gRPC modules from protos/.
# tests/unit/test_protos.py checks that running this changes nothing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/client}"
python -m grpc_tools.protoc -I"$root/protos" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$root"/protos/vitlens/v1/*.proto
