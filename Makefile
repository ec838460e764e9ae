# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The venv's tools (bidfcl, dvc) must be on PATH for DVC's stage commands.
RUN    := PATH="$(CURDIR)/$(BIN):$$PATH"

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= 1

.PHONY: run repro test lint install clean results

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The Prefect flow end to end on the built-in simulator: ingest, validate, version (DVC),
# train Bi-DFCL and baselines, evaluate on held-out RCT, promotion gate (MLflow registry).
run: $(STAMP)
	$(RUN) $(BIN)/python flows/bidfcl_flow.py

# The same stages through DVC (nothing to do right after `make run`).
repro: $(STAMP)
	$(RUN) $(BIN)/dvc repro

# The architecture contract (pyproject.toml [tool.importlinter]) first: a new import cycle or
# an import against the layers fails here, before any test runs.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

# docs/results.md, its figures and the README's results block, from the saved benchmark cells.
results: $(STAMP)
	$(BIN)/bidfcl report benchmarks/runs/* --out docs/results.md --readme README.md

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build src/*.egg-info
