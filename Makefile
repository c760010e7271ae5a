# marble: the two commands a user needs are `make demo` and `make test`.
# Each sets .venv up on a fresh clone: pip picks the torch build (on this machine it finds the local CPU
# wheel, which uv would not look for), then uv installs that file, marble and everything else at the
# versions and hashes of requirements.lock (the one lock shared with the images; it leaves torch out).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Which torch build pip picks; a GPU user adds the wheel index of a CUDA build, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
UV_SPEC ?= uv==0.13.9
EXTRAS ?= dev,mlflow
LOCK := requirements.lock
# Every extra an install (dev venv or image) may ask for; the lock is resolved for all of them at once.
LOCK_EXTRAS := dev mlflow hps kubeflow-registry training-operator
PIP_FLAGS ?= -q
STAMP := $(VENV)/.marble-installed
TORCH_REQ := $(VENV)/torch-requirement.txt
# pip's complaints about this machine's unused find-links locations, dropped; pip's exit status kept.
WITHOUT_PIP_NOISE = 2>&1 | { grep -v "^WARNING: Location" || true; }; exit $${PIPESTATUS[0]}

.PHONY: setup demo test test-slow test-all lint format bench compile clean images lock

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[setup] $(UV_SPEC) with pip, and the torch build pip picks for: $(TORCH_SPEC)"
	@$(BIN)/pip install $(PIP_FLAGS) $(UV_SPEC) $(WITHOUT_PIP_NOISE)
	@$(BIN)/pip install $(PIP_FLAGS) --dry-run --ignore-installed --no-deps --report $(VENV)/torch-pick.json $(TORCH_SPEC) \
	  $(WITHOUT_PIP_NOISE)
	@$(BIN)/python -c 'import json, sys; print("\n".join(p["metadata"]["name"] + " @ " + p["download_info"]["url"] \
	  for p in json.load(open(sys.argv[1]))["install"]))' $(VENV)/torch-pick.json > $(TORCH_REQ)
	@echo "[setup] uv: that torch file, then marble[$(EXTRAS)] at the versions of $(LOCK)"
	@$(BIN)/uv pip install --python $(BIN)/python -q -r $(TORCH_REQ) -c $(LOCK) -e ".[$(EXTRAS)]"
	@echo "[setup] checking the install (the first import of torch also writes its bytecode cache)"
	@$(BIN)/python -c "import marble, kfp, diffusers, peft, osqp, torch" || { echo "[setup] install failed" >&2; exit 1; }
	@touch $(STAMP)

# Re-resolve requirements.lock after a dependency change in pyproject.toml (keeps the other pins;
# `make lock UPGRADE=--upgrade` moves everything to the newest releases). torch and torchvision are
# left out: each install puts its own build (CPU, CUDA) in first. Resolved for the images' platform.
lock: $(STAMP)
	$(BIN)/uv pip compile --quiet pyproject.toml $(TORCH_REQ) $(addprefix --extra ,$(LOCK_EXTRAS)) $(UPGRADE) \
	  --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --no-emit-package torch --no-emit-package torchvision --custom-compile-command "make lock" -o $(LOCK)

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

# Bytecode is written even where PYTHONDONTWRITEBYTECODE is set: the in-process studies import the
# training stack first, so the reward study's `marble train` processes do not each compile it (its
# pilot would count that one-time cost into every run and plan fewer steps).
bench: $(STAMP)
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m bench.run_all

compile: $(STAMP)
	$(BIN)/marble pipeline compile --out pipelines/marble_pipeline.yaml

clean:
	rm -rf outputs .pytest_cache

# Build, push and pin the two pipeline images (needs a Docker daemon with buildx and a registry login).
# The pushed digests replace the placeholders in pipelines/images.py; the golden pipeline is recompiled.
IMAGE_REPO ?= ghcr.io/marble-ml
IMAGE_TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
# The clusters run x86-64 nodes; building on an arm64 laptop without it would push an image they cannot run.
IMAGE_PLATFORM ?= linux/amd64
images: $(STAMP)
	@docker info >/dev/null 2>&1 || { echo "[images] needs a running Docker daemon (docker info failed); nothing built" >&2; exit 2; }
	@set -euo pipefail; for role in cpu cuda; do \
	  ref="$(IMAGE_REPO)/marble-$$role:$(IMAGE_TAG)"; meta="$$(mktemp)"; \
	  echo "[images] building and pushing $$ref"; \
	  docker buildx build --platform $(IMAGE_PLATFORM) -f dockerfiles/Dockerfile.$$role -t "$$ref" --push \
	    --metadata-file "$$meta" .; \
	  digest="$$($(BIN)/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["containerimage.digest"])' "$$meta")"; \
	  $(BIN)/python -m pipelines.images pin "$$role" "$(IMAGE_REPO)/marble-$$role@$$digest"; rm -f "$$meta"; \
	done
	$(BIN)/marble pipeline compile --out pipelines/marble_pipeline.yaml
