# The README's quick start: `make demo` (train on the embedded demo data) and `make test`.
# Both create/update .venv from the pinned lock (requirements.lock) — nothing is installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.9

.PHONY: install data demo test test-fast test-benchmarks lint format lock clean-runs stack stack-down

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-sync whenever the lock, the project metadata or these rules change. --compile-bytecode:
# uv does not write .pyc files by default, and with PYTHONDONTWRITEBYTECODE set (as on our CI
# machines) Python never does either: every command then recompiled TensorFlow, Prefect and
# MLflow from source, ~8 s of CPU per process (BENCHMARKS.md, benchmark 4).
$(VENV)/.installed: requirements.lock pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip sync --quiet --compile-bytecode --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Restore data/ from the DVC remote committed in this repo (dvc-remote/): works offline.
data: install
	$(BIN)/dvc pull --quiet

demo: data
	$(BIN)/vggflow train --config configs/demo.yaml

# Two pytest workers (pytest-xdist): most tests wait on subprocesses and servers. Whole files per
# worker, in order: a module-wide fixture (the shared stack) must not be torn down between its tests.
# The benchmark scripts' smoke runs are a tier of their own (make test-benchmarks; CI runs both).
test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not benchmarks"

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not benchmarks"

test-benchmarks: install
	$(BIN)/python -m pytest -m benchmarks

# ruff: lint rules and the formatter, one line length (pyproject.toml, [tool.ruff]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Regenerate the lock after changing dependencies in pyproject.toml.
lock: | $(BIN)/python
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip compile --quiet pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

# The shared production stack on this machine (docs/production.md); then `eval "$$(.venv/bin/vggflow stack env)"`.
stack: install
	$(BIN)/vggflow stack up

stack-down: install
	$(BIN)/vggflow stack down

# Forget local runs: tracking store, caches, checkpoints (the data and code are untouched; so is a
# stack's folder, .vggflow/stack: `vggflow stack down`, then delete it by hand to forget the stack).
clean-runs:
	rm -rf mlflow/mlflow.db mlflow/artifacts
	[ ! -d .vggflow ] || find .vggflow -mindepth 1 -maxdepth 1 ! -name stack -exec rm -rf {} +
