# Two commands on a fresh machine with Python 3.11+: `make demo`, `make test`.
# Both create (once) and use a local virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# The in-process benchmarks (a minute or two each); the end-to-end ones start mosquitto and
# the daemons as processes and run for minutes: name them, e.g. BENCH="shed_latency".
BENCH ?= decision optimizer

.PHONY: demo test lint bench bench-list clean

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

lint: $(BIN)/.installed  ## ruff (docstrings too: D, Google style) and mypy --strict
	$(BIN)/ruff check controller drivers simulators tests benchmarks
	$(BIN)/mypy controller drivers simulators

bench: $(BIN)/.installed  ## benchmarks/bench_<name>.py for each name in BENCH, ARGS to each
	@for b in $(BENCH); do \
		echo "== benchmarks/bench_$$b.py $(ARGS)"; \
		$(BIN)/python benchmarks/bench_$$b.py $(ARGS) || exit 1; \
	done

bench-list:  ## every benchmark (a BENCH name) and what it measures
	@for f in benchmarks/bench_*.py; do \
		name=$${f#benchmarks/bench_}; \
		printf '%-14s %s\n' "$${name%.py}" "$$(head -1 $$f | sed 's/^"""//')"; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
