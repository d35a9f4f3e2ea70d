# Two commands set everything up on a fresh machine: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: venv test lint typecheck pytest bench proto run clean

venv: $(STAMP)

# CPU torch first (a file on this machine's disk), so nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

proto: venv
	$(BIN)/python -m personalize_service.protogen

lint: venv
	$(BIN)/ruff check personalize service tests loadtest

typecheck: venv
	$(BIN)/mypy personalize service

pytest: venv
	$(BIN)/python -m pytest -q -x --durations=15 tests

test: venv lint typecheck pytest

bench: venv
	$(BIN)/python loadtest/bench_engine.py --json loadtest/results/bench_engine.json

run: venv
	$(BIN)/personalize up

clean:
	rm -rf $(VENV) build *.egg-info
