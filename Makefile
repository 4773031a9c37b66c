# The two commands of the README: `make demo` (set up, then simulate the 4 real hospitals) and
# `make test`. Everything installs into .venv; torch comes first so the CPU build is used.
# `make test` also installs nginx if missing (.ci/setup-system, needs root or sudo): the
# deployment tests run Confide's coordinator behind it.
# requirements.lock pins every package to the version tested, as pip constraints (`-c`): pip,
# because uv and poetry resolve torch themselves and would fetch its CUDA build (gigabytes) over
# the CPU wheel installed first. `make lock` regenerates it from .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench lock

$(BIN)/confide: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock torch==2.13.0
	$(BIN)/pip install --quiet -c requirements.lock -e ".[dev]"
	touch $@

setup: $(BIN)/confide

demo: setup
	$(BIN)/confide simulate heart

# Two workers, one test file each at a time (a file's module fixtures, e.g. its federation, start
# once): the suite mostly waits on Flower's heartbeats and process starts, so on 2 cores two
# files side by side take little longer than one. Every test runs, slow ones included.
test: setup
	./.ci/setup-system
	$(BIN)/pytest -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m bench.run_all

# After a dependency change in pyproject.toml: install it unconstrained, then pin what is there.
# torch's local label (+cpu) is dropped: setup's torch line chooses the build, the lock its version.
lock:
	@test -x $(BIN)/pip || { echo "make lock: no $(VENV) yet; run make setup first"; exit 2; }
	$(BIN)/pip install --quiet -e ".[dev]"
	{ echo "# Every package make setup installs, at the version tested: pip constraints (-c)."; \
	  echo "# Regenerate with make lock after changing dependencies in pyproject.toml."; \
	  $(BIN)/pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)[+].*/\1/'; \
	} > requirements.lock
	touch $(BIN)/confide
