# Two commands from a fresh clone (see README.md):
#   make quickstart   installs into .venv and runs the quickstart sweep on an embedded local Ray
#   make test         installs into .venv (with the dev extra and Chromium) and runs the test suite
# torch is pinned to the CPU build: an unpinned torch pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
TORCH := torch==2.13.0
BIN := $(VENV)/bin

.PHONY: quickstart test install install-dev chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'

# Debian's Chromium for the dashboard and MLflow UI browser tests (needs root; skipped when present).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

quickstart: install
	$(BIN)/python sweeps/run.py --config sweeps/quickstart.yaml

test: install-dev chromium
	$(BIN)/python -m pytest
