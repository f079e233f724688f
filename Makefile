# Everything a fresh machine needs comes from pyproject.toml, installed into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --editable '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m trio_cluster.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks.local
	$(BIN)/python -m benchmarks.storage
	$(BIN)/python -m benchmarks.cluster --plot benchmarks/latency.png
	$(BIN)/python -m benchmarks.state
	$(BIN)/python -m benchmarks.hostile
