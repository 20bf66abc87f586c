# hotswap: `make serve`, `make test`, `make bench`, `make lint-docker`.
# Every install step is stamped inside the venv, so a re-run does nothing unless pyproject.toml,
# this Makefile or TORCH_SPEC changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

# Without an NVIDIA GPU take the CPU build of torch (found on local disk here); with one, PyPI's
# default (CUDA) build. Override with e.g. `make test TORCH_SPEC='torch==2.7.1'`.
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_NVIDIA),torch,torch==2.13.0)

STAMPS := $(VENV)/.stamps

.PHONY: serve cluster test bench default-model example-adapters lint-docker venv clean-venv FORCE

serve: $(STAMPS)/runtime
	$(PY) -m server --host $(HOST) --port $(PORT)

# hotswap on Ray Serve: REPLICAS replicas of the default model, one shared store (README "Scale-out").
REPLICAS ?= 2
cluster: $(STAMPS)/dev
	$(PY) -m server.cluster --host $(HOST) --port $(PORT) --replicas $(REPLICAS)

test: $(STAMPS)/dev
	$(PY) -m server.kernels
	$(PY) -m pytest $(PYTEST_ARGS)

# Reproduces BENCHMARKS.md's table: builds the bench model once (offline), then server beside PEFT.
bench: $(STAMPS)/bench
	$(PY) -m load_tests.build_bench_model --out load_tests/models
	mkdir -p bench_out
	$(PY) -m load_tests.bench --spawn --rounds 4 --baseline peft --json bench_out/bench.json --png bench_out/bench.png

# Re-creates default_model/ (about 45 minutes on 2 CPU cores) and examples/ (about 10), then measures
# the adapters through the server. Deterministic for a given seed, thread count and Python stdlib.
default-model: $(STAMPS)/dev
	$(PY) -m scripts.pretrain --out default_model
	$(MAKE) example-adapters

example-adapters: $(STAMPS)/dev
	$(PY) -m scripts.train_adapters --base default_model --out examples
	$(PY) -m scripts.evaluate --base default_model --examples examples --json examples/evaluation.json

lint-docker: $(STAMPS)/dev
	$(VENV)/bin/hadolint Dockerfile

venv: $(STAMPS)/dev

clean-venv:
	rm -rf $(VENV)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Rewritten only when TORCH_SPEC changes, so the stamps below depend on its value.
$(STAMPS)/torch-spec: FORCE | $(PY)
	@mkdir -p $(STAMPS)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

$(STAMPS)/torch: $(STAMPS)/torch-spec
	$(PIP) install '$(TORCH_SPEC)'
	@touch $@

$(STAMPS)/runtime: pyproject.toml Makefile $(STAMPS)/torch
	$(PIP) install -e .
	@touch $@

$(STAMPS)/dev: pyproject.toml Makefile $(STAMPS)/torch
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps 'lorax-client==0.6.3'  # its pins conflict with transformers 5 (pyproject.toml)
	@touch $@

$(STAMPS)/bench: pyproject.toml Makefile $(STAMPS)/torch
	$(PIP) install -e '.[dev,bench]'
	@touch $@

FORCE:
