# lazycat — the two commands are `make up` (install and start the box) and `make test`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up install test test-fast lint format bench clean

up: install
	$(BIN)/lazycat up

install: $(STAMP)
	@deploy/system-packages.sh runtime

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lazycat needs Python 3.11 or newer (this is %s)" % sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: install
	@deploy/system-packages.sh test
	$(BIN)/pytest

# Everything but the browser and full-stack tests: a quick loop while editing.
test-fast: install
	$(BIN)/pytest -m "not e2e"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy lazycat transport

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Each prints the machine and its figures; docs/benchmarks.md records them with the command.
bench: install
	$(BIN)/python tests/bench/bench_console.py
	$(BIN)/python tests/bench/bench_session.py
	$(BIN)/python tests/bench/bench_relay.py
	$(BIN)/python tests/bench/failover_sim.py
	$(BIN)/python tests/bench/bench_lab.py  # the NAT lab: root, after make test's packages

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
