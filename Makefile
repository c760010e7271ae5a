# marble: the two commands a user needs are `make demo` and `make test`.
# Each creates .venv on a fresh clone (CPU torch first, then the project with its dev extras).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build lies on this machine's disk; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index.
TORCH_SPEC ?= torch==2.13.0
PIP_FLAGS ?= -q
STAMP := $(VENV)/.marble-installed

.PHONY: setup demo test test-slow test-all lint format bench compile clean images

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[setup] installing $(TORCH_SPEC) (CPU build unless TORCH_SPEC says otherwise)"
	@$(BIN)/pip install $(PIP_FLAGS) $(TORCH_SPEC) numpy 2>&1 | grep -v "^WARNING: Location" || true
	@$(BIN)/python -c "import torch" || { echo "[setup] torch failed to install" >&2; exit 1; }
	@echo "[setup] installing marble with its dev and mlflow extras"
	@$(BIN)/pip install $(PIP_FLAGS) -e ".[dev,mlflow]" 2>&1 | grep -v "^WARNING: Location" || true
	@$(BIN)/python -c "import marble, kfp, diffusers, peft, osqp" || { echo "[setup] install failed" >&2; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/marble pipeline run --local --config configs/tiny.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu and not cluster"

lint: $(STAMP)
	$(BIN)/ruff check marble components pipelines bench tests
	$(BIN)/ruff format --check marble components pipelines bench tests

format: $(STAMP)
	$(BIN)/ruff check --fix marble components pipelines bench tests
	$(BIN)/ruff format marble components pipelines bench tests

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

compile: $(STAMP)
	$(BIN)/marble pipeline compile --out pipelines/marble_pipeline.yaml

clean:
	rm -rf outputs .pytest_cache

# Build, push and pin the two pipeline images (needs a Docker daemon with buildx and a registry login).
# The pushed digests replace the placeholders in pipelines/images.py; the golden pipeline is recompiled.
IMAGE_REPO ?= ghcr.io/marble-ml
IMAGE_TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
images: $(STAMP)
	@docker info >/dev/null 2>&1 || { echo "[images] needs a running Docker daemon (docker info failed); nothing built" >&2; exit 2; }
	@set -euo pipefail; for role in cpu cuda; do \
	  ref="$(IMAGE_REPO)/marble-$$role:$(IMAGE_TAG)"; meta="$$(mktemp)"; \
	  echo "[images] building and pushing $$ref"; \
	  docker buildx build -f dockerfiles/Dockerfile.$$role -t "$$ref" --push --metadata-file "$$meta" .; \
	  digest="$$($(BIN)/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["containerimage.digest"])' "$$meta")"; \
	  $(BIN)/python -m pipelines.images pin "$$role" "$(IMAGE_REPO)/marble-$$role@$$digest"; rm -f "$$meta"; \
	done
	$(BIN)/marble pipeline compile --out pipelines/marble_pipeline.yaml
