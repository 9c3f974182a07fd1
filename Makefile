# `make run` and `make test` set everything up on a fresh clone (Python 3.11+), then run.
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= config.example.toml
# torch comes first so that the project's `torch>=2.4` is already satisfied; on machines
# whose pip offers several builds this picks the one named here (override: make run TORCH=torch).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
TEST_WORKERS ?= 2

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "imsight needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	@# A config that points at the tiny test model (the example does) gets it built on first use.
	@$(BIN)/imsight tiny-model --config $(CONFIG)
	$(BIN)/imsight run --config $(CONFIG)

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	@# Two processes, one torch thread each: most of the suite is single-threaded Python (compiling,
	@# subprocesses, loopback servers); 10-11.5 minutes on 2 cores in one process, 6.5-7.5 in two.
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

bench: $(VENV)/.installed
	$(BIN)/python bench/api_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
