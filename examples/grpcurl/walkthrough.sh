#!/usr/bin/env bash
# The vitlens API from a shell with `buf curl`, one command per step; above each is the grpcurl
# command that does the same. The buf curl lines are what tests/integration/test_any_language.py
# runs; the grpcurl lines are NOT run anywhere (grpcurl is not installable where the tests run:
# it is on neither PyPI, npm nor Debian bookworm).
#
#   examples/grpcurl/walkthrough.sh [HOST:PORT] [IMAGE]     (default localhost:50051, scene.png)
#
# Needs buf (`npm ci --prefix tools`, or BUF=/path/to/buf), jq and base64. In JSON, `bytes` are
# base64 and int64 values (tensor shapes) are strings.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SERVER=${1:-localhost:50051}
IMAGE=${2:-$HERE/scene.png}
BUF=${BUF:-$HERE/../../tools/node_modules/.bin/buf}
PROTOS=$HERE/../../protos           # the contract, for calls without server reflection
RPC_PROTOS=$HERE/../node/protos     # google/rpc/error_details.proto, to decode error details
URL=http://$SERVER/vitlens.v1.VitlensService
PNG=$(base64 < "$IMAGE" | tr -d '\n')
# 8 images, the top-2 classes of each, heatmaps at input resolution plus relevance matrices.
LARGE='{method: "generic", images: [range(8) | {encoded: $png, id: "scene-\(.)"}],
        target: {topK: 2}, options: {grid: "OUTPUT_GRID_INPUT", returnRelevance: true,
        outputDtype: $dtype}}'

step() { printf '== %s\n' "$*"; }

step "1 services, from server reflection"
# grpcurl -plaintext localhost:50051 list
"$BUF" curl --protocol grpc --list-services "http://$SERVER"

step "2 GetModel, schema from protos/ instead of reflection"
# grpcurl -plaintext -import-path protos -proto vitlens/v1/vitlens.proto -d '{"name": ""}' \
#   localhost:50051 vitlens.v1.VitlensService/GetModel
"$BUF" curl --protocol grpc --schema "$PROTOS" -d '{"name": ""}' "$URL/GetModel" \
  | jq -c '{name, inputSize, patchGrid, labels, methods: [.methods[].name]}'

step "3 Predict one inline PNG"
PREDICT='{images: [{encoded: $png, id: "scene"}], topK: 3}'
# jq -n --arg png "$PNG" "$PREDICT" \
#   | grpcurl -plaintext -d @ localhost:50051 vitlens.v1.VitlensService/Predict
jq -n --arg png "$PNG" "$PREDICT" | "$BUF" curl --protocol grpc -d @- "$URL/Predict" \
  | jq -c '.results[0]'

step "4 Explain with method options: in JSON a google.protobuf.Struct is a plain object"
ROLLOUT='{method: "rollout", images: [{encoded: $png}],
          options: {methodOptions: {head_fusion: "max", discard_ratio: 0.9}}}'
# jq -n --arg png "$PNG" "$ROLLOUT" \
#   | grpcurl -plaintext -d @ localhost:50051 vitlens.v1.VitlensService/Explain
jq -n --arg png "$PNG" "$ROLLOUT" | "$BUF" curl --protocol grpc -d @- "$URL/Explain" \
  | jq -c '{model, method, heatmap: .results[0].explanations[0].heatmap}'

step "5 a 5.7 MB reply: above the 4 MiB receive limit, which buf curl cannot raise"
# jq -n --arg png "$PNG" --arg dtype DTYPE_FLOAT32 "$LARGE" \
#   | grpcurl -plaintext -max-msg-sz 67108864 -d @ localhost:50051 vitlens.v1.VitlensService/Explain
jq -n --arg png "$PNG" --arg dtype DTYPE_FLOAT32 "$LARGE" \
  | "$BUF" curl --protocol grpc -d @- "$URL/Explain" 2>&1 | jq -c . \
  || echo "(buf curl failed: RESOURCE_EXHAUSTED)"

step "6 the same in float16: 2.8 MB, within the limit"
# jq -n --arg png "$PNG" --arg dtype DTYPE_FLOAT16 "$LARGE" \
#   | grpcurl -plaintext -d @ localhost:50051 vitlens.v1.VitlensService/Explain
jq -n --arg png "$PNG" --arg dtype DTYPE_FLOAT16 "$LARGE" \
  | "$BUF" curl --protocol grpc -d @- "$URL/Explain" \
  | jq -c '{images: (.results | length), explanations: ([.results[].explanations | length] | add),
            heatmap: .results[0].explanations[0].heatmap | {dtype, shape},
            relevance: .results[0].explanations[0].relevance | {dtype, shape}}'

step "7 an error: the status, its message and details (buf curl prints them on stderr)"
# grpcurl -plaintext -d '{"method": "no_such_method"}' \
#   localhost:50051 vitlens.v1.VitlensService/Explain
STATUS=0
ERROR=$("$BUF" curl --protocol grpc -d '{"method": "no_such_method"}' "$URL/Explain" 2>&1) \
  || STATUS=$?
echo "$ERROR" | jq -c .
echo "(buf curl exit status $STATUS: the gRPC code times 8)"

step "8 the google.rpc.BadRequest detail decoded"
# grpcurl prints each detail with its @type; one it cannot resolve keeps its bytes in "@value".
# buf curl drops the base64 padding, which `base64 -d` needs back.
echo "$ERROR" \
  | jq -r '.details[] | select(.type == "google.rpc.BadRequest") | .value
           | . + "==="[:(4 - length % 4) % 4]' \
  | base64 -d \
  | "$BUF" convert "$RPC_PROTOS" --type google.rpc.BadRequest --from -#format=binpb --to -#format=json
echo
