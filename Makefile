# Tally: `make dev` runs the whole pipeline with demo traffic; `make test` passes the tests.
# Both create the virtualenv they need from nothing but this repo and the package registries.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install dev test test-fast lint format clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

dev: install
	$(BIN)/tally dev --demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check core schemas ingest consumers query
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest tests/unit

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format core schemas ingest consumers query

clean:
	rm -rf $(VENV) .tally .pytest_cache .mypy_cache .ruff_cache .hypothesis
