# Two commands set everything up on a fresh machine: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
# Where torch comes from: empty = pip's configured index (this machine's holds the CPU wheel); elsewhere
# `make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu`, or PyPI's default wheels bundle CUDA (GBs).
TORCH_INDEX ?=
# Every install is held to these pins (the dependency closure of `.[dev]`, from a working venv; regenerate
# with `make constraints` after changing a bound in pyproject.toml). The Dockerfile uses the same file.
CONSTRAINTS := constraints.txt

.PHONY: venv test lint typecheck pytest unit integration e2e bench bench-gpu proto run clean constraints

venv: $(STAMP)

# CPU torch first, so nothing pulls a multi-GB CUDA build; then the package with every extra (dev).
$(STAMP): pyproject.toml setup.py $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

constraints: venv
	$(BIN)/python tools/constraints.py > $(CONSTRAINTS)

proto: venv
	$(BIN)/python -m personalize_service.protogen

lint: venv
	$(BIN)/ruff check personalize service tests loadtest setup.py tools
	$(BIN)/ruff format --check personalize service tests loadtest setup.py tools

typecheck: venv
	$(BIN)/mypy personalize service

pytest: venv
	$(BIN)/python -m pytest -q -x --durations=15 tests

# One tier at a time: unit (pure, fast), integration (real Valkey, S3, gRPC), e2e (`personalize up`).
unit: venv
	$(BIN)/python -m pytest -q -x tests/unit

integration: venv
	$(BIN)/python -m pytest -q -x tests/integration

e2e: venv
	$(BIN)/python -m pytest -q -x --durations=15 tests/e2e

test: venv lint typecheck pytest

# Every benchmark, full size (BENCH_ARGS=--quick for a short pass); JSON under loadtest/results/.
BENCH_ARGS ?=
bench: venv
	$(BIN)/python loadtest/bench_engine.py $(BENCH_ARGS) --json loadtest/results/bench_engine.json
	$(BIN)/python loadtest/bench_cache.py $(BENCH_ARGS) --json loadtest/results/bench_cache.json
	$(BIN)/python loadtest/bench_feedback.py $(BENCH_ARGS) --json loadtest/results/bench_feedback.json
	$(BIN)/python loadtest/bench_routing.py $(BENCH_ARGS) --cluster --json loadtest/results/bench_routing.json

# The engine benchmark at Llama-3.2-1B and Llama-3.1-8B shapes, random weights, bfloat16 on CUDA (refused
# without one); JSON under loadtest/results/, rows into docs/benchmarks.md between its bench-gpu markers.
bench-gpu: venv
	$(BIN)/python loadtest/bench_gpu.py $(BENCH_ARGS) --json-dir loadtest/results --doc docs/benchmarks.md

run: venv
	$(BIN)/personalize up

clean:
	rm -rf $(VENV) build *.egg-info

# ---- deployment: Dockerfile and k8s/ (docs/deploy.md) ---------------------------------------------
CHECKOV := checkov==3.3.30
CHECKOV_VENV := .venv-checkov

.PHONY: wheel checkov-venv k8s-check

# The package wheel (library, service, generated stubs), built as the Dockerfile builds it.
wheel: venv
	$(BIN)/pip wheel --no-deps --wheel-dir dist .

# checkov pins old versions of common packages, so it gets a virtualenv of its own; the stamp holds the
# pin, and a new pin rebuilds it. tests/unit/test_k8s.py runs this target when it needs checkov.
checkov-venv:
	@test "$$(cat $(CHECKOV_VENV)/.installed 2>/dev/null)" = "$(CHECKOV)" || { \
		rm -rf $(CHECKOV_VENV) && $(PY) -m venv $(CHECKOV_VENV) \
		&& $(CHECKOV_VENV)/bin/pip install -q $(CHECKOV) \
		&& echo "$(CHECKOV)" > $(CHECKOV_VENV)/.installed; }

# Render every overlay, validate it against the Kubernetes schemas, scan it with checkov, and check the
# manifests and the Dockerfile against the service's settings (also part of `make test`'s pytest run).
k8s-check: venv checkov-venv
	$(BIN)/python -m pytest -q tests/unit/test_k8s.py tests/unit/test_k8s_image.py

# Load test (docs/benchmarks.md): `personalize up --workers 2` on a temp data dir (one worker while `up`
# refuses more), locust headless for DURATION seconds with USERS users, report in loadtest/results/<time>/.
DURATION ?= 60
USERS ?= 20
SPAWN_RATE ?= 5
LOADTEST_ARGS ?=
.PHONY: loadtest
loadtest: venv
	$(BIN)/python loadtest/loadtest_run.py --duration $(DURATION) --users $(USERS) --spawn-rate $(SPAWN_RATE) \
		$(LOADTEST_ARGS)

# Fault injection (loadtest/chaos.py): a hypothesis fuzz of every RPC with FUZZ_EXAMPLES cases, then
# `personalize up --workers 3` on SeaweedFS under load while worker/trainer/Valkey kills, S3 down, a
# corrupted adapter and a partition are injected in turn; JSON summary in loadtest/results/chaos.json.
# Exits non-zero when an acked event is lost or applied twice, or a call fails outside a fault window.
FUZZ_EXAMPLES ?= 2000
CHAOS_ARGS ?=
.PHONY: chaos
chaos: venv
	PERSONALIZE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/e2e/test_fuzz.py
	$(BIN)/python loadtest/chaos.py --json loadtest/results/chaos.json $(CHAOS_ARGS)
