# userstream: `make demo` runs everything in one process; `make test` runs lint and every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint format bench bench-quick bench-latency bench-writers chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/userstream demo

lint: $(STAMP)
	$(BIN)/ruff check core sync gateway tests bench
	$(BIN)/ruff format --check core sync gateway tests bench
	$(BIN)/mypy core sync gateway

test: lint
	$(BIN)/pytest

format: $(STAMP)
	$(BIN)/ruff check --fix core sync gateway tests bench
	$(BIN)/ruff format core sync gateway tests bench

bench: $(STAMP)
	$(BIN)/python -m bench.suite

bench-quick: $(STAMP)
	$(BIN)/python -m bench.suite --quick --out bench/results-quick.json

bench-latency: $(STAMP)
	$(BIN)/python -m bench.latency

bench-writers: $(STAMP)
	$(BIN)/python -m bench.writers
	$(BIN)/python -m bench.writers --relay-ceiling

chaos: $(STAMP)
	$(BIN)/python -m bench.chaos --minutes 10

clean:
	rm -rf $(VENV) .userstream .pytest_cache .mypy_cache .ruff_cache
