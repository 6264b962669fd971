#!/usr/bin/env bash
# Every measurement and test that needs a GPU, in one command (about 11 minutes on one H100/H200):
#
#   bash scripts/gpu_checks.sh [OUT_DIR]          # OUT_DIR defaults to gpu_out/
#
# 1. `pytest -m gpu`: CUDA maps equal CPU maps for every method (tests/gpu/test_gpu.py).
# 2. Serving (issue #5): scripts/bench_serving.py on ViT-B/16 with random weights, `generic` and
#    `rollout`, batching on and off, and the in-process roof of the same run; the sections land
#    in BENCHMARKS.md (replacing older runs of the same device, model, method and precision).
# 3. token_reflection explanations/s on ViT-B/16 (issue #4), scripts/bench_reflection.py.
# 4. Demo-model training speed on the GPU (issue #3): a short `vitlens train-demo --device cuda`
#    run whose log gives images/s at 112 px and at 224 px, from which the full schedule's time
#    follows (21,500 steps of 64 scenes).
# 5. Mixed load on the GPU (issue #13): one-image `generic` p50 alone and beside four clients
#    of `token_reflection`, scripts/bench_mixed_load.py (section in OUT_DIR/mixed_load.md; copy
#    it into benchmarks/mixed_load.md).
# 6. Image-text N x M (issue #16): `generic` on a ViT-Tiny/16 CLIP at 224 px, one batched call for
#    IMAGES x TEXTS pairs against the per-pair loop, scripts/bench_image_text.py --device.
# 7. Exemplar CLIP training speed on the GPU (issue #16): CLIP_STEPS steps of the shipped
#    schedule's batches (`clip_train --device`), whose log gives images/s at 160 px; the full
#    3,200-step schedule's time follows. Scenes are rendered on one CPU core meanwhile.
# 8. Exemplar VQA training speed on the GPU (issue #17): VQA_STEPS steps of the shipped schedule
#    of each exemplar (`vqa_train --arch visualbert|lxmert --device`), whose logs give questions/s.
# 9. DETR (issue #18): DETR_STEPS steps of the exemplar detector's schedule (`detr_train
#    --device`, whose log gives images/s), and scripts/bench_detr.py: K detections per image
#    explained by one vectorised backward pass, by K passes and by B·K separate calls.
# 10. Methods ÷ roof (issue #19): every method's explanations/s over the roof of the passes it
#    declares, and Predict over the fused forward, scripts/bench_methods.py on MODEL (section in
#    BENCHMARKS.md, files in OUT_DIR/methods_roof/).
# 11. Peers (issue #19): vitlens in process and over gRPC against captum, lxt and (where OpenCV
#    is installed) pytorch-grad-cam, scripts/bench_peers.py (section in BENCHMARKS.md).
#
# DEVICE, MODEL, CONCURRENCY, DURATION, ROOF_MAX_BATCH, REFLECTION_MODEL, REFLECTION_IMAGES,
# REPEATS, TRAIN_STEPS, IMAGES, TEXTS, CLIP_STEPS, VQA_STEPS, DETR_STEPS, ROOF_BATCHES, ROOF_ROUNDS
# and PEER_BATCH override the defaults. A CPU smoke
# run of the script itself:
#   DEVICE=cpu MODEL=vitlens-demo CONCURRENCY=1,4 DURATION=3 ROOF_MAX_BATCH=4 \
#   REFLECTION_MODEL=demo REFLECTION_IMAGES=1 REPEATS=1 TRAIN_STEPS=12 IMAGES=2 TEXTS=2 CLIP_STEPS=4 \
#   VQA_STEPS=4 DETR_STEPS=4 ROOF_BATCHES='1 2' ROOF_ROUNDS=1 PEER_BATCH=2 \
#   bash scripts/gpu_checks.sh /tmp/smoke
# Logs, the updated BENCHMARKS.md and a summary go to OUT_DIR; paste the figures into
# benchmarks/token_reflection.md and the README. Needs the packages of `pip install -e ./client -e
# '.[dev]'`. On the device tool's H100/H200 image, which lacks some of them, carry wheels
# (download them here with `bash scripts/gpu_wheels.sh`, which prints the `run` command line).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="client:server:.${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda:0}
MODEL=${MODEL:-vit_base_patch16_224:random}
REFLECTION_MODEL=${REFLECTION_MODEL:-${MODEL%%:*}}
DURATION=${DURATION:-15}
CONCURRENCY=${CONCURRENCY:-1,128,256}
TRAIN_STEPS=${TRAIN_STEPS:-600}
status=0
step() { # step NAME COMMAND...: run, log to OUT/NAME.log, remember a failure, go on
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    local began=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - began)) s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $PY -c 'import sys, torch, timm; print(sys.version.split()[0], torch.__version__, timm.__version__)'
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"

step gpu_tests "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_gpu.py
# issue #19 first: the methods ÷ roof and peer tables (steps 10 and 11 above)
ROOF_MODEL=${MODEL%%:*}
step methods_roof "$PY" scripts/bench_methods.py --model "$ROOF_MODEL" --device "$DEVICE" \
    --batch-sizes ${ROOF_BATCHES:-1 8 32 64} --rounds "${ROOF_ROUNDS:-3}" --out "$OUT/methods_roof"
step peers "$PY" scripts/bench_peers.py --model "$ROOF_MODEL" --device "$DEVICE" \
    --batch "${PEER_BATCH:-16}" --max-batch-size 64 --rounds "${ROOF_ROUNDS:-3}" --out "$OUT/peers"
step serving "$PY" scripts/bench_serving.py --model "$MODEL" --device "$DEVICE" \
    --precision bf16 --methods generic,rollout --concurrency "$CONCURRENCY" --requests 20000 \
    --duration "$DURATION" --max-batch-size 128 --max-delay-ms 0 --roof-max-batch "${ROOF_MAX_BATCH:-256}" \
    --processes 4 --json "$OUT/serving.json" --note "scripts/gpu_checks.sh"
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
step reflection "$PY" scripts/bench_reflection.py --model "$REFLECTION_MODEL" \
    --device "${DEVICE%%:*}" --batch "${REFLECTION_IMAGES:-8}" --warmup 1 --repeats "${REPEATS:-5}"
step training "$PY" -m vitlens_server.training.train --device "${DEVICE}" \
    --low-res-steps "$TRAIN_STEPS" --full-res-steps $((TRAIN_STEPS / 6)) --eval-count 200 \
    --workers "$(($(nproc) - 2))" --out "$OUT/train-check.safetensors"
rm -f "$OUT"/train-check.*
grep -h "img/s" "$OUT/training.log" | tail -n 4 >>"$OUT/summary.txt"
cp benchmarks/mixed_load.md "$OUT/mixed_load.md"
step mixed_load "$PY" scripts/bench_mixed_load.py --device "$DEVICE" --requests 400 \
    --slow-clients 4 --out "$OUT/mixed_load.md"
step image_text "$PY" scripts/bench_image_text.py --device "$DEVICE" --images "${IMAGES:-32}" \
    --texts "${TEXTS:-8}" --repeat "${REPEATS:-5}"
CLIP_STEPS=${CLIP_STEPS:-300}
step clip_training "$PY" -m vitlens_server.training.clip_train --device "$DEVICE" --threads 4 \
    --full-res-steps "$CLIP_STEPS" --eval-every 0 --final-eval-count 100 \
    --out "$OUT/clip-check" --export-dir "$OUT/clip-check/export"
rm -rf "$OUT/clip-check"
grep -h "img/s" "$OUT/clip_training.log" | tail -n 2 >>"$OUT/summary.txt"
VQA_STEPS=${VQA_STEPS:-200}
for arch in visualbert lxmert; do
    step "vqa_training_$arch" "$PY" -m vitlens_server.training.vqa_train --arch "$arch" \
        --device "$DEVICE" --threads 4 --steps "$VQA_STEPS" --eval-every 0 \
        --final-eval-count 100 --out "$OUT/vqa-check" --export-dir "$OUT/vqa-check/$arch"
    grep -h "q/s" "$OUT/vqa_training_$arch.log" | tail -n 1 >>"$OUT/summary.txt"
done
rm -rf "$OUT/vqa-check"
DETR_STEPS=${DETR_STEPS:-300}
step detr_training "$PY" -m vitlens_server.training.detr_train --device "$DEVICE" --threads 4 \
    --steps "$DETR_STEPS" --eval-every 0 --final-eval-count 64 --out "$OUT/detr-check" \
    --export-dir "$OUT/detr-check/export"
rm -rf "$OUT/detr-check"
grep -h "img/s" "$OUT/detr_training.log" | tail -n 1 >>"$OUT/summary.txt"
step detr_explain "$PY" scripts/bench_detr.py --device "$DEVICE" --batch 8 --detections 1 4 8
exit $status
