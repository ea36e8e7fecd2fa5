# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit e2e clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/anybilld demo

lint: $(STAMP)
	$(BIN)/ruff check anybilld tests
	$(BIN)/ruff format --check anybilld tests

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q --ignore=tests/e2e

e2e: $(STAMP)
	$(BIN)/pytest -q tests/e2e

test: lint typecheck
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) anybilld-demo .mypy_cache .ruff_cache .pytest_cache
