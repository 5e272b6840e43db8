"""What `etl-assets run` reports, read back from Dagster's own results and event log: the
per-shard table, the checks and the one-line reason of a failure. Shared by the runner (runs in
this process) and `--submit` (runs in a deployment), so both print the same summary."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from etl_assets.lib.errors import NO_SPACE
from etl_assets.lib.events import parse_shard_event


@dataclass
class ShardRow:
    """One line of the per-shard table."""

    shard_id: int
    attempts: int = 0
    records: int | None = None
    elapsed_ms: int | None = None
    ok: bool = False
    error: str = ""
    run_id: str = ""
    skipped: bool = False


@dataclass
class RunOutcome:
    """Everything `etl-assets run` reports; exit code 0 iff `ok`."""

    shards: list[ShardRow] = field(default_factory=list)
    checks: list[tuple[str, bool, dict]] = field(default_factory=list)
    reason: str = ""
    export_path: str = ""
    snapshot_path: str = ""
    run_ids: list[str] = field(default_factory=list)
    # What the run is doing now: sources, shards or customer_profiles (named when interrupted).
    phase: str = "sources"

    @property
    def ok(self) -> bool:
        return not self.reason


def metadata_values(evaluation: Any) -> dict[str, Any]:
    """An asset check evaluation's metadata as plain values."""
    return {k: getattr(v, "value", v) for k, v in (evaluation.metadata or {}).items()}


def first_failure(result: dg.ExecuteInProcessResult) -> str:
    """One line: the first failed step's user-facing error."""
    return failure_of(result.all_events)


def failure_of(events: Iterable[dg.DagsterEvent]) -> str:
    """One line: the user-facing error of the first step failure among a run's events."""
    for event in events:
        if event.is_step_failure:
            data = event.step_failure_data
            if data.user_failure_data is not None and data.user_failure_data.description:
                return data.user_failure_data.description
            error = data.error
            # Dagster wraps user errors; the innermost cause is the one a user can act on.
            while error is not None and error.cause is not None:
                error = error.cause
            message = error.message.strip().splitlines() if error else []
            return f"{event.step_key}: {message[0] if message else 'failed'}"
    return "run failed"


def shard_events(instance: dg.DagsterInstance, run_id: str) -> list[dict[str, Any]]:
    """The JSON shard events of a run, in log order."""
    events = []
    for entry in instance.all_logs(run_id):
        parsed = parse_shard_event(entry.user_message or "")
        if parsed is not None:
            events.append(parsed)
    return events


def shard_row(shard_id: int, events: list[dict[str, Any]], success: bool, error: str) -> ShardRow:
    """Summarize one shard run's events as a table row."""
    row = ShardRow(shard_id=shard_id, ok=success, error="" if success else error,
                   skipped=any(e["event"] == "shard_skip" for e in events))
    row.attempts = sum(1 for e in events if e["event"] == "shard_start")
    ends = [e for e in events if e["event"] in ("shard_end", "shard_skip")]
    if ends:
        row.records = int(ends[-1]["record_count"])
        row.elapsed_ms = int(ends[-1]["elapsed_ms"])
    return row


def shard_failure_reason(shards: list[ShardRow]) -> str:
    """One line naming the failed shards ("" if none failed)."""
    failed = [r for r in shards if not r.ok]
    if not failed:
        return ""
    first = failed[0]
    full = next((r for r in failed if r.error.endswith(f": {NO_SPACE}")), None)
    if full is not None:
        return full.error  # the disk is what to fix, whichever shard noticed first
    others = f" (and shards {', '.join(str(r.shard_id) for r in failed[1:])})" if failed[1:] else ""
    return (f"shard {first.shard_id} failed after {first.attempts} attempt(s): {first.error}"
            f"{others}; customer_profiles was not rebuilt")
