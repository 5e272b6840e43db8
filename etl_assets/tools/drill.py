"""The chaos drill: fail one shard's first attempt, then prove the retry healed it exactly once."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb

from etl_assets.defs.contracts import names_for
from etl_assets.lib import staging
from etl_assets.lib.paths import duckdb_literal, duckdb_literals
from etl_assets.lib.schema import MAX_LINE_BYTES
from etl_assets.lib.settings import EtlSettings
from etl_assets.tools.outcome import RunOutcome, shard_events
from etl_assets.tools.runner import run_pipeline

STEP = "shard_profiles"  # the shipped pipeline's shard step


def shard_step(settings: EtlSettings) -> str:
    """The step key of the pipeline's shard asset (`fleet__shard_profiles` under a prefix)."""
    return "__".join(names_for(settings).shard_profiles.path)


def entities(key: str) -> str:
    """What the key counts, in words: customer_id -> customers."""
    return (key.removesuffix("_id") if key.endswith("_id") else key) + "s"


@dataclass
class Attempt:
    """One attempt of the shard step, as Dagster's event log recorded it."""

    number: int
    start: float
    end: float | None = None
    outcome: str = "running"
    error: str = ""
    wait_before_s: float | None = None


def retry_timeline(instance: dg.DagsterInstance, run_id: str, step: str = STEP) -> list[Attempt]:
    """Attempts of the shard step from STEP_START/RESTARTED/UP_FOR_RETRY/SUCCESS/FAILURE events."""
    attempts: list[Attempt] = []
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or entry.step_key != step:
            continue
        kind = event.event_type_value
        if kind in ("STEP_START", "STEP_RESTARTED"):
            attempt = Attempt(number=len(attempts) + 1, start=entry.timestamp)
            if attempts and attempts[-1].end is not None:
                attempt.wait_before_s = entry.timestamp - attempts[-1].end
            attempts.append(attempt)
        elif attempts and kind in ("STEP_UP_FOR_RETRY", "STEP_SUCCESS", "STEP_FAILURE"):
            attempts[-1].end = entry.timestamp
            attempts[-1].outcome = {"STEP_UP_FOR_RETRY": "failed, retrying",
                                    "STEP_SUCCESS": "success", "STEP_FAILURE": "failed"}[kind]
    errors = [e for e in shard_events(instance, run_id) if e["event"] == "shard_error"]
    for event in errors:
        for attempt in attempts:
            if attempt.number == event.get("attempt"):
                attempt.error = str(event.get("error", ""))
    return attempts


def verify_export(settings: EtlSettings) -> dict[str, Any]:
    """Export rows vs distinct accepted input customers, and duplicate ids in the export."""
    staged = staging.current_sources(settings)
    paths = duckdb_literals(staging.all_slice_files(staged, settings.shard_ids))
    decl = settings.declaration
    key = decl.key
    raw = duckdb_literals(Path(settings.data_dir) / s.filename for s in decl.sources)
    con = duckdb.connect()
    try:
        customers = con.execute(
            f"SELECT count(DISTINCT {key}) FROM read_parquet($p)", {"p": paths}
        ).fetchone()[0]
        raw_ids = con.execute(
            f"SELECT count(DISTINCT trim({key})) FROM read_csv($p, union_by_name = true, "
            f"all_varchar = true, max_line_size = $max_line) WHERE trim({key}) <> ''",
            {"p": raw, "max_line": MAX_LINE_BYTES}
        ).fetchone()[0]
        rows, distinct = con.execute(
            f"SELECT count(*), count(DISTINCT {key}) FROM read_csv($p, all_varchar = true, "
            "max_line_size = $max_line)",
            {"p": duckdb_literal(settings.export_path), "max_line": MAX_LINE_BYTES},
        ).fetchone()
    finally:
        con.close()
    return {"export_rows": int(rows), "input_customers": int(customers),
            "input_ids_incl_quarantined": int(raw_ids), "duplicates": int(rows - distinct)}


def _clock(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%H:%M:%S.%f")[:-3]


def run_drill(settings: EtlSettings, echo: Callable[[str], None] = print,
              pipeline: Callable[..., RunOutcome] = run_pipeline) -> int:
    """Run the pipeline with the chaos shard, print the timeline and the two verifications.

    `pipeline(settings, echo=...)` runs it: here by default, or (`drill --submit`) through a
    deployment's run queue and workers.
    """
    outcome: RunOutcome = pipeline(settings, echo=echo)
    shard = settings.chaos_fail_shard
    row = next((r for r in outcome.shards if r.shard_id == shard), None)
    if row is None or not row.run_id:
        echo(f"FAILED: the drill never reached shard {shard}: {outcome.reason}")
        return 1
    echo("")
    echo(f"retry timeline of shard {shard} (run {row.run_id}):")
    echo(f"{'attempt':>7}  {'start':>12}  {'end':>12}  {'wait_before_s':>13}  outcome")
    for a in retry_timeline(dg.DagsterInstance.get(), row.run_id, shard_step(settings)):
        wait = "" if a.wait_before_s is None else f"{a.wait_before_s:.2f}"
        detail = f" ({a.error})" if a.error else ""
        echo(f"{a.number:>7}  {_clock(a.start):>12}  {_clock(a.end):>12}  {wait:>13}  {a.outcome}{detail}")
    if not outcome.ok:
        echo(f"FAILED: {outcome.reason}")
        return 1
    figures = verify_export(settings)
    same = figures["export_rows"] == figures["input_customers"]
    unique = figures["duplicates"] == 0
    echo("")
    key = settings.declaration.key
    echo(f"{'PASS' if same else 'FAIL'}  export rows {figures['export_rows']} = distinct input "
         f"{entities(key)} {figures['input_customers']} (ids in files, quarantined rows "
         f"included: {figures['input_ids_incl_quarantined']})")
    echo(f"{'PASS' if unique else 'FAIL'}  duplicate {key} in export: {figures['duplicates']}")
    echo(f"export: {settings.export_path}")
    return 0 if same and unique else 1
