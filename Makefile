# The two commands of the README: `make demo` and `make test`.
# Both create .venv and install vitlens into it on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision pinned to the releases available offline on the build machines (the
# Dockerfiles' TORCH_VERSION/TORCHVISION_VERSION defaults match; tests/integration/test_lock.py).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint protos clean deploy-check proto-check proto-release oip-venv peers \
	node-example promtool

# Both distributions, editable, in one pip call: the SDK `vitlens` from ./client and the server
# `vitlens-server` from ./ (with its dev extra). Naming ./client here makes pip take `vitlens`
# from this checkout, never from an index, when it resolves vitlens-server's `vitlens[cli]==`.
$(BIN)/.installed: pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS) -e ./client -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python scripts/demo.py --out demo_out

test: install deploy-check proto-check oip-venv node-example promtool
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The peers of scripts/bench_peers.py (captum, pytorch-grad-cam, lxt), benchmarks only. lxt 2.1
# declares bitsandbytes, accelerate and more for its language-model patches; its AttnLRP rules
# need none of them, so it goes in without its dependencies.
peers: install
	$(BIN)/pip install --quiet -e '.[peers]'
	$(BIN)/pip install --quiet --no-deps 'lxt==2.1'

# Render deploy/k8s (kustomize), validate it against Kubernetes schemas, hadolint the Dockerfiles.
deploy-check: install
	PATH=$(BIN):$$PATH $(BIN)/python deploy/validate.py

# The contract: buf lint (STANDARD), buf format, and buf breaking against the newest released
# image in protos/releases/ (v1 only grows). buf comes from npm (tools/package-lock.json).
BUF := tools/node_modules/.bin/buf
RELEASED = $(shell ls protos/releases/*.binpb | sort -V | tail -n 1)

$(BUF): tools/package.json tools/package-lock.json
	npm ci --prefix tools --no-audit --no-fund --loglevel=error
	touch $@

proto-check: $(BUF)
	$(BUF) lint
	$(BUF) format -d --exit-code
	$(BUF) breaking --against $(RELEASED)

# Record the contract as released: `make proto-release VERSION=v0.3.0` (then tag the commit).
proto-release: $(BUF)
	@test -n "$(VERSION)" || { echo "usage: make proto-release VERSION=vX.Y.Z"; exit 2; }
	$(BUF) build -o protos/releases/$(VERSION).binpb

# Triton's client, for the Open Inference Protocol example and tests: it needs protobuf<7, so it
# gets a venv of its own (tests/rpc/test_oip.py runs examples/tritonclient/ with it).
OIP_VENV ?= build/oip-venv
$(OIP_VENV)/.installed: examples/tritonclient/requirements.txt
	$(PYTHON) -m venv $(OIP_VENV)
	$(OIP_VENV)/bin/pip install --quiet -r examples/tritonclient/requirements.txt
	touch $@

oip-venv: $(OIP_VENV)/.installed

# The Node example's packages (tests/integration/test_any_language.py; its buf curl walkthrough
# uses $(BUF) and jq).
NODE_EXAMPLE := examples/node/node_modules/.package-lock.json
$(NODE_EXAMPLE): examples/node/package.json examples/node/package-lock.json
	npm ci --prefix examples/node --no-audit --no-fund --loglevel=error
	touch $@

node-example: $(NODE_EXAMPLE) $(BUF)

# promtool (Debian's prometheus package) runs the HPA rules' unit tests in test_deploy.py.
promtool:
	@command -v promtool >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

protos: install
	PATH=$(BIN):$$PATH scripts/gen_protos.sh
	PATH=$(BIN):$$PATH scripts/gen_oip_protos.sh

clean:
	rm -rf $(VENV) demo_out .pytest_cache $(OIP_VENV) examples/node/node_modules tools/node_modules

# The long fuzz profile (issue #14): thousands of hostile requests per RPC against one test
# server. The status codes seen go to build/fuzz-long.json, each test's outcome (with the
# falsifying example) to build/fuzz-long.xml. `make test` runs the short `ci` profile.
.PHONY: fuzz
fuzz: install
	mkdir -p build
	VITLENS_FUZZ_PROFILE=long VITLENS_FUZZ_REPORT=build/fuzz-long.json \
		$(BIN)/python -m pytest -q -m fuzz --timeout=0 --junitxml=build/fuzz-long.xml \
		tests/rpc/test_fuzz.py
