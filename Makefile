# mlplatform: `make run` trains and serves the demo model, `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# All platform state lives under one directory; Dagster's instance is inside it.
export MLPLATFORM_HOME ?= $(CURDIR)/.mlplatform
export DAGSTER_HOME ?= $(MLPLATFORM_HOME)/dagster

# Installs come from uv.lock (exact versions of every package), through a pinned uv that lives in
# its own small environment, so nothing outside the checkout is needed beyond Python.
UV_VERSION := 0.13.9
UV := .tools/bin/uv
export UV_PROJECT_ENVIRONMENT := $(CURDIR)/$(VENV)
export UV_PYTHON_DOWNLOADS := never

.PHONY: install run serve test test-fast ui stop demo-drift demo-rollout lint format lock clean

install: $(BIN)/.installed

$(UV):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "mlplatform needs Python 3.11 or newer (set PYTHON=python3.11)")'
	@echo "Installing uv $(UV_VERSION) into .tools/ ..."
	@$(PYTHON) -m venv .tools
	@.tools/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(BIN)/.installed: pyproject.toml uv.lock | $(UV)
	@echo "Installing the locked dependencies (uv.lock) into $(VENV)/ ..."
	@$(UV) sync --locked --all-extras --python $(PYTHON) --quiet
	@touch $@

## lock: update uv.lock after changing the dependencies in pyproject.toml
lock: $(UV)
	$(UV) lock --python $(PYTHON)

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	@mkdir -p $(DAGSTER_HOME)
	@cp dagster.yaml $@

## run: materialize the whole asset graph and leave the endpoint running
run: install $(DAGSTER_HOME)/dagster.yaml
	@$(BIN)/python -m mlplatform run

## serve: deploy the registry's champion again, without retraining (after `make stop`, a reboot)
serve: install $(DAGSTER_HOME)/dagster.yaml
	@$(BIN)/python -m mlplatform serve

## test: the whole test suite
test: install
	$(BIN)/python -m pytest

## test-fast: the tests that need no Ray cluster (a few minutes)
test-fast: install
	$(BIN)/python -m pytest -m "not ray"

## ui: Dagster web UI and daemon (sensors) on http://127.0.0.1:3000
ui: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

## stop: stop the local Ray head and the endpoint
stop:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m mlplatform stop; fi

## demo-drift: the self-healing loop with the real daemon, timed (records benchmarks/RESULTS.md)
demo-drift: install
	$(BIN)/python benchmarks/drift_loop.py

## demo-rollout: v2 rolled out shadow -> canary -> champion under live traffic, a bad v3 rolled back
demo-rollout: install
	$(BIN)/python benchmarks/rollout_demo.py

## lint: style (ruff) and the package's layers (import-linter contracts in pyproject.toml)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## clean: stop everything and delete all platform state
clean: stop
	rm -rf $(MLPLATFORM_HOME)
