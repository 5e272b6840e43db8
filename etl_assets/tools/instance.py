"""The Dagster instance etl-assets sets up: its `dagster.yaml`, the run queue and its limits, and
the run coordinator that tags every run with who launched it.

`etl-assets home` (and `run`, `drill`) write the home's `dagster.yaml` from `instance_yaml`:
runs, events and schedules in SQLite files inside the home, or, with `DAGSTER_PG_URL` set, in
PostgreSQL through dagster-postgres, the URL read from the environment by whichever process
opens the instance (it is never written into a file). Both set the run queue: at most
`run_slots` runs in progress at once and one run per shard partition at a time; each queued
run's DuckDB connections then get `cores / slots` threads (`defs.resources.for_this_run`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import yaml

from etl_assets.defs.contracts import LAUNCHED_BY_TAG, PARTITION_TAG, launched_by
from etl_assets.lib import errors, limits
from etl_assets.lib.settings import (
    BROKER_VAR,
    PG_URL_VAR,
    EtlSettings,
    broker_url,
    pg_url,
)

# The first line of every dagster.yaml etl-assets writes. A file that starts with it is
# rewritten whenever what it is made from changes (cores, memory limit, DAGSTER_PG_URL or
# CELERY_BROKER_URL set or not); one without it is the user's and is left alone.
MARKER = "# Written by `etl-assets home` (etl_assets/tools/instance.py); delete this line to keep"
# What etl-assets wrote before the marker existed: also ours to rewrite.
LEGACY_YAML = """\
telemetry:
  enabled: false
compute_logs:
  module: dagster._core.storage.noop_compute_log_manager
  class: NoOpComputeLogManager
"""

# A fixed key for the session advisory lock taken while an instance on Postgres is opened.
SCHEMA_LOCK_KEY = int.from_bytes(hashlib.sha256(b"etl_assets: dagster schema").digest()[:8],
                                 "big", signed=True)


class EtlRunCoordinator(dg.QueuedRunCoordinator):
    """Dagster's run queue, plus one tag: every run submitted to it (from the UI, a backfill, a
    sensor, a schedule) records who launched it in LAUNCHED_BY_TAG before it is queued, so the
    UI can filter on it and the queue's tag limits can use it."""

    def submit_run(self, context: dg.SubmitRunContext) -> dg.DagsterRun:
        run = context.dagster_run
        origin = launched_by(run.tags)
        if run.tags.get(LAUNCHED_BY_TAG) != origin:
            # The instance the run is submitted to, from the submission's own context.
            context.workspace.instance.add_run_tags(run.run_id, {LAUNCHED_BY_TAG: origin})
        return super().submit_run(context)


def instance_yaml(settings: EtlSettings, postgres: bool, n_cores: int, ram: int,
                  celery: bool = False, home: Path | None = None) -> str:
    """The `dagster.yaml` of a home: storage (SQLite in the home, or Postgres at
    DAGSTER_PG_URL), no compute-log capture, and the run queue with its limits for this machine
    (with `celery`, CELERY_BROKER_URL set, the runs here only orchestrate: the workers do the
    work).

    With SQLite and the `home` known, the events of every run go to one database,
    `history/events/event_log.db` (Dagster's `ConsolidatedSqliteEventLogStorage`), instead of
    Dagster's default of a new database per run.
    """
    slots = limits.run_slots(n_cores, ram, settings.memory_limit)
    memory = settings.memory_limit
    queue_comment = f"""\
# The run queue (the daemon launches queued runs): at most one run in progress per core
# ({n_cores}), fewer if DUCKDB_MEMORY_LIMIT ({memory}) per run would take over half the memory;
# a queued run's DuckDB gets cores / max_concurrent_runs threads."""
    dequeue = ""
    if celery:
        slots = limits.orchestrator_slots(n_cores, ram)
        # Each phase of `etl-assets run --submit` waits for the queue to launch its runs; the
        # default 5 s between looks would add three of them to a pipeline.
        dequeue = "\n    dequeue_interval_seconds: 1"
        queue_comment = f"""\
# The run queue (the daemon launches queued runs). With {BROKER_VAR} set, a run here only
# orchestrates: Celery workers run its steps, one at a time each, so their number bounds the
# work; here at most {limits.ORCHESTRATORS_PER_CORE} runs per core ({n_cores}), one per GB."""
    storage = f"""\
# Runs, events and schedules in PostgreSQL; each process reads the URL from ${PG_URL_VAR}.
storage:
  postgres:
    postgres_url:
      env: {PG_URL_VAR}
""" if postgres else ""
    if not postgres and home is not None:
        # Double-quoted on one line, any character escaped as YAML reads it back (JSON writes
        # a character past U+FFFF as two surrogates, which YAML reads as two broken ones).
        events_dir = yaml.safe_dump(str(Path(home).resolve() / "history" / "events"),
                                    default_style='"', width=float("inf")).strip()
        storage = f"""\
# The events of every run in one SQLite database (a class Dagster documents for this file).
# Its default creates a database per run, table by table, loading its migration scripts each
# time: a sample's first run much longer (docs/performance.md, "Dagster and the process").
event_log_storage:
  module: dagster._core.storage.event_log
  class: ConsolidatedSqliteEventLogStorage
  config:
    base_dir: {events_dir}
"""
    return f"""\
{MARKER}
# your own edits. Otherwise rewritten when the cores, DUCKDB_MEMORY_LIMIT or {PG_URL_VAR} change.
telemetry:
  enabled: false
# No compute-log capture: Dagster's default starts `tail -F` and a Python watcher process for
# every run, only to mirror the steps' stdout, and our steps log through context.log (which the
# UI shows) instead. Ctrl-C in a terminal reached those helpers too.
compute_logs:
  module: dagster._core.storage.noop_compute_log_manager
  class: NoOpComputeLogManager
{storage}{queue_comment} One run per shard
# partition at a time: two would do the same work, one after the other.
run_coordinator:
  module: etl_assets.tools.instance
  class: EtlRunCoordinator
  config:
    max_concurrent_runs: {slots}{dequeue}
    tag_concurrency_limits:
      - key: {PARTITION_TAG}
        value:
          applyLimitPerUniqueValue: true
        limit: 1
"""


def write_instance_config(home: Path, settings: EtlSettings, url: str | None) -> bool:
    """Write `home/dagster.yaml` unless it is current or the user's own; True if written.

    Replaced atomically (temp file, fsync, rename), so processes starting at the same moment
    each read a whole file. A file of the user's is left alone, but not one that would ignore
    DAGSTER_PG_URL: that would put the runs in SQLite without a word.
    """
    config = home / "dagster.yaml"
    text = instance_yaml(settings, url is not None, limits.cores(), limits.ram_bytes(),
                         celery=broker_url() is not None, home=home)
    try:
        current: str | None = config.read_text(encoding="utf-8")
    except FileNotFoundError:
        current = None
    if current == text:
        return False
    if current is not None and not current.startswith(MARKER) and current != LEGACY_YAML:
        if url is not None and PG_URL_VAR not in current:
            raise errors.PathError(
                config, f"{PG_URL_VAR} is set, but this dagster.yaml (not written by etl-assets) "
                f"does not read it: delete the file, or give it storage: postgres: postgres_url: "
                f"env: {PG_URL_VAR}")
        return False
    temp = config.with_name(f".dagster.yaml.{os.getpid()}.tmp")
    try:
        with open(temp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, config)
    finally:
        temp.unlink(missing_ok=True)
    return True


@contextmanager
def schema_lock(url: str | None) -> Iterator[None]:
    """With Postgres, hold a session advisory lock meanwhile (nothing to do without).

    Opening an instance on a fresh database creates Dagster's tables; processes doing that at
    the same moment (concurrent first runs, here or on other machines) collide, and Dagster
    then retries a few times with warnings. Under this lock they create them one at a time: the
    first creates them, the others find them.
    """
    if url is None:
        yield
        return
    import psycopg2

    con = psycopg2.connect("postgresql://" + url.split("://", 1)[1], connect_timeout=10)
    try:
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK_KEY,))
        yield
    finally:
        con.close()  # ends the session, which releases the lock


def open_instance() -> dg.DagsterInstance:
    """The instance at DAGSTER_HOME, its storage created (under `schema_lock` on Postgres)."""
    with schema_lock(pg_url()):
        return dg.DagsterInstance.get()


class PostgresWaits(logging.Filter):
    """dagster-postgres logs a warning for every failed connection attempt, each with the
    driver's whole message: an outage printed dozens of them before the run's one FAILED line.
    On the root logger, this keeps one line per wait instead: the first failure of an outage,
    then at most one every `every_s` seconds while it lasts."""

    RETRY = "Retrying failed database connection"

    def __init__(self, every_s: float = 10.0) -> None:
        super().__init__()
        self.every_s = every_s
        self.started: float | None = None
        self.shown = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.RETRY):
            return True
        now = time.monotonic()
        if self.started is None or now - self.shown > 3 * self.every_s:
            self.started = now  # a new outage (nothing heard for a while)
        if now == self.started or now - self.shown >= self.every_s:
            reason = record.args[0] if isinstance(record.args, tuple) and record.args else ""
            first = str(reason).strip().splitlines()[0] if str(reason).strip() else ""
            waited = f", {now - self.started:.0f} s so far" if now > self.started else ""
            print(f"waiting: PostgreSQL did not answer{waited}; retrying ({first})",
                  file=sys.stderr, flush=True)
            self.shown = now
        return False


def quiet_postgres_retries() -> None:
    """Install `PostgresWaits` on the root logger (where dagster-postgres logs), once."""
    root = logging.getLogger()
    if not any(isinstance(f, PostgresWaits) for f in root.filters):
        root.addFilter(PostgresWaits())

