# Two commands matter: `make run` and `make test`. Both set up .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 3000
HOST ?= 127.0.0.1
export DAGSTER_HOME ?= $(CURDIR)/var/dagster_home

# Four test processes on two cores: the longest tests mostly wait (daemon ticks, servers
# starting), and the others keep both cores busy meanwhile; the suite is then bound by its CPU
# time (docs/performance.md, "The test suite").
# Test homes on tmpfs where there is one: the suite creates hundreds of SQLite and DuckDB files
# whose fsyncs otherwise make it wait on the disk (test_skip: 145 s -> 91 s wall here).
TEST_TMPDIR ?= $(if $(wildcard /dev/shm/.),/dev/shm,/tmp)
PYTEST := TMPDIR=$(TEST_TMPDIR) $(BIN)/python -m pytest -n 4 --dist loadscope
FAST := not browser and not daemon and not kill and not cli and not slow

.PHONY: help install run test test-fast lint ui sample clean chromium postgres broker

## Every target with one line each.
help:
	@awk '/^## /{doc=substr($$0, 4); next} /^[a-z-]+:/ && doc {split($$1, t, ":"); printf "  make %-10s %s\n", t[1], doc} {doc=""}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

## Create .venv and install the package with its test tools (the other targets do it first).
install: $(STAMP)

## Run the whole pipeline on the shipped sample (data/), warehouse and Dagster home in var/.
run: $(STAMP)
	$(BIN)/etl-assets run

## The whole test suite, in parallel; prints the 15 slowest tests.
test: $(STAMP)
	$(PYTEST) --durations=15

## The inner loop (within 90 s): no browser, daemon, kill, command subprocess or many-run module.
test-fast: $(STAMP)
	ETL_TEST_QUICK=1 $(PYTEST) -m "$(FAST)"

## Ruff over the package and the tests (CI fails on any finding).
lint: $(STAMP)
	$(BIN)/ruff check etl_assets etl_assets_tests

## Dagster UI + daemon on http://127.0.0.1:3000 (HOST=, PORT= to change), same home as `make run`.
ui: $(STAMP)
	$(BIN)/etl-assets home >/dev/null
	$(BIN)/dagster dev -w workspace.yaml -h $(HOST) -p $(PORT)

## Headless Chromium for the browser test, from Debian (Playwright's own download does not work here).
chromium:
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

## PostgreSQL server binaries for the tests that start their own server (Debian's postgresql).
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; }

## Redis server for the distributed tests' Celery broker (Debian's redis-server).
broker:
	command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }

## Regenerate the committed 1,000-customer sample.
sample: $(STAMP)
	$(BIN)/etl-assets generate --rows 1000 --seed 42 --out data

## Remove var/ (warehouse, staging, Dagster home, export) and test caches.
clean:
	rm -rf var .pytest_cache .hypothesis
