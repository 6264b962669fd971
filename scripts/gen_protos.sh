#!/usr/bin/env bash
# Regenerate the committed protobuf/gRPC modules from protos/, and the copy of the .proto files
# the SDK wheel ships (client/vitlens/protos/, the import root of the installed files).
# tests/unit/test_protos.py checks that running this changes nothing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/client}"
python -m grpc_tools.protoc -I"$root/protos" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$root"/protos/vitlens/v1/*.proto
copy="$out/vitlens/protos/vitlens/v1"
mkdir -p "$copy"
rm -f "$copy"/*.proto
cp "$root"/protos/vitlens/v1/*.proto "$copy"/
