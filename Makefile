# Two commands on a fresh machine with Python 3.11+: `make demo`, `make test`.
# Both create (once) and use a local virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mineops needs Python 3.11 or newer (set PYTHON=python3.12 or similar)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

demo: $(BIN)/.installed  ## a simulated 1,000-miner site with its controller (Ctrl-C stops)
	$(BIN)/mineops demo $(ARGS)

test: $(BIN)/.installed  ## the whole test suite
	$(BIN)/pytest $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check controller drivers simulators tests benchmarks
	$(BIN)/mypy controller drivers simulators

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_optimizer.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
