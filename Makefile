# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

run: $(VENV)/.installed
	$(PY) examples/session_endings.py

# The whole suite, as CI runs it, in parallel (pytest-xdist): two workers per
# core, at most 8 (most tests wait on sockets, processes and timeouts, not on
# the CPU); tests marked slow start first. The quick loop: pytest -m "not slow"
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(8, 2 * (os.cpu_count() or 1)))")

test: $(VENV)/.installed lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src tests examples bench
	$(VENV)/bin/mypy

# All systems and figures, ~18 min; options: make bench BENCH_ARGS="--systems lapse-memory,twisted"
# (a run other than the full default one writes its chart to bench/results/, git-ignored)
bench: $(VENV)/.bench-installed
	$(PY) bench/run.py $(BENCH_ARGS)

# The request path in process, µs/request (~10 s); options: BENCH_ARGS="--requests 2000"
.PHONY: bench-micro
bench-micro: $(VENV)/.bench-installed
	$(PY) bench/run.py micro $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info
