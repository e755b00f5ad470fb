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

.PHONY: venv run test test-unit test-integration lint format lock dvc-remote clean help

help:
	@echo "make run      run the pipeline (dvc repro) on the embedded sample; PROFILE=ci|gpu selects a profile"
	@echo "make test     the whole test suite (unit, integration, dags, e2e)"
	@echo "make lint     ruff"
	@echo "make lock     re-resolve pyproject.toml into requirements.lock"

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

test: $(STAMP)
	$(BIN)/python -m pytest

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

clean:
	rm -rf data artifacts reports/*.json reports/*.png .pytest_cache
