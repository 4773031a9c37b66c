# The two commands of the README: `make demo` (set up, then simulate the 4 real hospitals) and
# `make test`. Everything installs into .venv; torch comes first so the CPU build is used.
# `make test` also installs nginx if missing (.ci/setup-system, needs root or sudo): the
# deployment tests run Confide's coordinator behind it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench

$(BIN)/confide: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/confide

demo: setup
	$(BIN)/confide simulate heart

test: setup
	./.ci/setup-system
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m bench.run_all
