# adfilter: `make run` (the whole pipeline on the embedded sample) and `make test`.
# Both create .venv from requirements.lock when it is missing or older than the lock.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?=
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg

.PHONY: venv run test test-long test-unit test-integration lint format lock dvc-remote clean help airflow mlflow-ui

help:
	@echo "make run      run the pipeline (dvc repro) on the embedded sample; PROFILE=ci|gpu selects a profile"
	@echo "make test     the whole test suite (unit, integration, dags, e2e)"
	@echo "make lint     ruff"
	@echo "make lock     re-resolve pyproject.toml into requirements.lock"
	@echo "make airflow  local Airflow (UI on :8080) with the project DAGs; prints the login"
	@echo "make mlflow-ui  the MLflow UI (runs, registry, aliases) on :5000"
	@echo "make serve    the HTTP API (adfilter serve) on serve.host:serve.port"
	@echo "make bench    cascade vs deep-model-only over HTTP -> reports/bench.json"

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP)

# A local folder is the default DVC remote; see the README for S3/MinIO.
dvc-remote:
	@mkdir -p .dvc-remote

run: $(STAMP) dvc-remote
	@if [ -n "$(PROFILE)" ]; then $(BIN)/adfilter profile $(PROFILE); fi
	$(BIN)/dvc repro
	$(BIN)/dvc push --quiet || echo "dvc push to the default remote failed; the pipeline outputs are still in the local cache"

# `long` tests (whole-pipeline DAG runs through dag.test) are deselected here to keep CI
# within its budget; pytest reports them as deselected and `make test-long` runs them.
test: $(STAMP)
	@echo "make test: deselecting tests marked 'long'; run them with: make test-long"
	$(BIN)/python -m pytest -m "not long"

test-long: $(STAMP)
	$(BIN)/python -m pytest -m long

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration tests/dags tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .

# Re-resolve the direct dependencies and freeze the full set, the way Airflow ships constraints.
lock:
	rm -rf /tmp/adfilter-lock && $(PYTHON) -m venv /tmp/adfilter-lock
	/tmp/adfilter-lock/bin/pip install --quiet -e ".[dev,postgres]"
	/tmp/adfilter-lock/bin/pip freeze --exclude-editable | grep -v '^-e' > requirements.lock

# --- serving (serving/, docker/)
.PHONY: serve bench

serve: $(STAMP)
	$(BIN)/adfilter serve

# Needs the exported bundle (serve.bundle) and the test split (dvc repro export).
bench: $(STAMP)
	$(BIN)/python -m serving.bench

# A local Airflow (standalone: API server + UI, scheduler, DAG processor, triggerer on SQLite)
# with the project's DAGs; the login is printed once the UI is up. Ctrl-C stops it.
AIRFLOW_HOME ?= $(abspath .airflow)
AIRFLOW_PORT ?= 8080
MLFLOW_PORT ?= 5000

airflow: $(STAMP)
	@mkdir -p $(AIRFLOW_HOME)
	@export AIRFLOW_HOME=$(AIRFLOW_HOME) AIRFLOW__CORE__DAGS_FOLDER=$(abspath dags) \
	  AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__API__PORT=$(AIRFLOW_PORT) \
	  AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://localhost:$(AIRFLOW_PORT)/execution/ \
	  ADFILTER_PROJECT_DIR=$(abspath .); \
	$(BIN)/airflow standalone > $(AIRFLOW_HOME)/standalone.log 2>&1 & pid=$$!; \
	trap 'kill $$pid; wait $$pid' INT TERM; \
	pw=$(AIRFLOW_HOME)/simple_auth_manager_passwords.json.generated; \
	for i in $$(seq 1 180); do \
	  if [ -s $$pw ] && curl -sf -o /dev/null http://127.0.0.1:$(AIRFLOW_PORT)/api/v2/monitor/health; then break; fi; \
	  kill -0 $$pid 2>/dev/null || { tail -40 $(AIRFLOW_HOME)/standalone.log; exit 1; }; sleep 1; done; \
	$(BIN)/python -c "import json,sys; u=json.load(open(sys.argv[1])); print('Airflow UI: http://localhost:$(AIRFLOW_PORT)'); [print(f'login: {k} / {v}') for k,v in u.items()]" $$pw; \
	echo "DAGs: ad_filter_train (trigger it with the form), ad_filter_retrain, ad_filter_drift; log: $(AIRFLOW_HOME)/standalone.log"; \
	wait $$pid

# The MLflow UI over the tracking store params.yaml names (runs, the ad-filter registry, aliases).
mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri "$$($(BIN)/python -c 'from adfilter.config import load_params; print(load_params().mlflow.tracking_uri)')" \
	  --host 127.0.0.1 --port $(MLFLOW_PORT)

clean:
	rm -rf data artifacts reports/*.json reports/*.png .pytest_cache
