# Two commands matter: `make run` and `make test`. Both set up .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 3000
HOST ?= 127.0.0.1
export DAGSTER_HOME ?= $(CURDIR)/var/dagster_home

.PHONY: install run test ui sample clean chromium

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Run the whole pipeline on the shipped sample (data/), warehouse and Dagster home in var/.
run: $(STAMP)
	$(BIN)/etl-assets run

## The whole test suite.
test: $(STAMP)
	$(BIN)/python -m pytest

## Dagster UI + daemon on http://$(HOST):$(PORT), same Dagster home and warehouse as `make run`.
ui: $(STAMP)
	$(BIN)/etl-assets home >/dev/null
	$(BIN)/dagster dev -w workspace.yaml -h $(HOST) -p $(PORT)

## Headless Chromium for the browser test, from Debian (Playwright's own download does not work here).
chromium:
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

## Regenerate the committed 1,000-customer sample.
sample: $(STAMP)
	$(BIN)/etl-assets generate --rows 1000 --seed 42 --out data

clean:
	rm -rf var .pytest_cache .hypothesis
