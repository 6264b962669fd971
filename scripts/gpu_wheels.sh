#!/usr/bin/env bash
# Wheels for running scripts/gpu_checks.sh on the device tool's GPU image (Python 3.12, x86_64),
# which has torch, timm, numpy, numba, grpcio and pytest but not every package vitlens needs, or
# not at the versions its generated gRPC code checks for. Downloads them into .whl/ (ignored by
# git) and prints the device `run` arguments that install them and run the checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(
    grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
    pytest-asyncio==1.5.0 prometheus-client==0.26.0 safetensors==0.8.0
    # image-text models (issue #16): open_clip and transformers with what they import
    open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 regex==2026.11.19 transformers==5.24.0
    tokenizers==0.23.3 huggingface-hub==2.4.0 hf-xet==1.8.0 typer==0.29.2 click==8.5.1
    shellingham==1.5.4 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
    # scripts/bench_peers.py (issue #19): captum with what it imports (pytorch-grad-cam needs
    # OpenCV, too large to carry: its row reads "not run" on the GPU)
    captum==0.9.0 tqdm==4.70.1 matplotlib==3.11.2 contourpy==1.4.0 cycler==0.12.1
    fonttools==4.68.0 kiwisolver==1.5.1 pyparsing==3.3.3 python-dateutil==4.0.0 six==1.17.0
    pillow==13.0.0
)
rm -rf .whl && mkdir .whl
for package in "${PACKAGES[@]}"; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "$package"
done
# lxt 2.1 is published as a source distribution only; its wheel is pure Python
python3 -m pip wheel --quiet --no-deps -w .whl lxt==2.1
ls .whl
du -sh .whl
cat <<'EOF'
device run:  carry [".whl"], timeout_s 600, command:
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && bash scripts/gpu_checks.sh $OUT
EOF
