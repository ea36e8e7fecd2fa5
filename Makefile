# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit e2e bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/anybilld demo

lint: $(STAMP)
	$(BIN)/ruff check anybilld tests bench
	$(BIN)/ruff format --check anybilld tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q --ignore=tests/e2e

e2e: $(STAMP)
	$(BIN)/pytest -q tests/e2e

test: lint typecheck
	$(BIN)/pytest -q

# The benchmark (README, "Benchmark"): N = 100, 1,000, 10,000 and the two baselines, about
# 10-15 minutes on 2 cores. BENCH_ARGS="--n 100,1000 --quick" for a short run.
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) anybilld-demo .mypy_cache .ruff_cache .pytest_cache
