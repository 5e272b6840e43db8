"""Building profiles: one shard's merge and score, whether a shard is current, and the merged
`customer_profiles` table with its export, published all or nothing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import duckdb

from etl_assets.lib import staging, warehouse
from etl_assets.lib.faults import Hook
from etl_assets.lib.paths import duckdb_literals
from etl_assets.lib.rules import install_rules, merge_sql
from etl_assets.lib.settings import EtlSettings
from etl_assets.lib.validation import file_sha256


# Bump when the rows a shard writes would change for the same input (rules, merge, columns).
CODE_VERSION = "1"


class ChaosFailure(RuntimeError):
    """The injected failure of the chaos drill (CHAOS_FAIL_SHARD)."""


class ShardsNotCurrentError(RuntimeError):
    """Some shards were not written from the current staged sources: nothing may be merged."""


@dataclass(frozen=True)
class ShardResult:
    """What one shard write produced."""

    shard_id: int
    record_count: int
    source_data_hash: str
    preview: list[tuple]


def build_shard(
    settings: EtlSettings,
    shard_id: int,
    run_id: str,
    hook: Optional[Hook] = None,
) -> ShardResult:
    """Merge and score one shard's slices, then overwrite its rows in the warehouse."""
    staged = staging.current_sources(settings)
    source_hash = staging.shard_input_hash(staged, shard_id)
    with warehouse.scratch(settings.duckdb_limits) as con:
        install_rules(con)
        # Views, not copies: the merge reads each slice once, straight from its Parquet file.
        for name, source in staged.items():
            con.read_parquet(duckdb_literals(source.slice_files(shard_id))).create_view(name)
        con.execute(f"CREATE TEMP TABLE new_rows AS {merge_sql()}", {"shard_id": shard_id})
        preview = con.execute(
            "SELECT customer_id, email, health_score, churn_risk, expansion_potential "
            "FROM new_rows ORDER BY customer_id LIMIT 5"
        ).fetchall()
        with warehouse.attached(con, settings.duckdb_path, settings.lock_timeout_s):
            written = warehouse.overwrite_shard(
                con,
                "new_rows",
                shard_count=settings.shard_count,
                shard_id=shard_id,
                manifest={
                    "source_data_hash": source_hash,
                    "code_version": CODE_VERSION,
                    "run_id": run_id,
                },
                hook=hook or settings.hook,
            )
    return ShardResult(shard_id, written, source_hash, preview)


def shard_status(
    settings: EtlSettings, con: Optional[duckdb.DuckDBPyConnection] = None
) -> dict[int, Optional[dict]]:
    """Per shard: its manifest entry if its rows were written from the current staged inputs
    and code, else None (stale or missing).

    Judged against the manifest written in the same transaction as the shard's rows, so a
    replaced or deleted warehouse can never pass for current. `con` must have it attached.
    """
    staged = staging.current_sources(settings)
    if con is None:
        with warehouse.read_only(settings.duckdb_path, settings.lock_timeout_s) as own:
            manifest = {} if own is None else warehouse.read_manifest(own, settings.shard_count)
    else:
        manifest = warehouse.read_manifest(con, settings.shard_count)
    status: dict[int, Optional[dict]] = {}
    for k in settings.shard_ids:
        entry = manifest.get(k)
        current = entry is not None and (entry["source_data_hash"], entry["code_version"]) == (
            staging.shard_input_hash(staged, k), CODE_VERSION)
        status[k] = entry if current else None
    return status


def stale_shards(settings: EtlSettings, con: Optional[duckdb.DuckDBPyConnection] = None) -> list[int]:
    """Shards whose warehouse rows were not written from the current staged inputs and code."""
    return [k for k, entry in shard_status(settings, con).items() if entry is None]


def skip_reason(entry: dict) -> str:
    """Why a shard with this manifest entry needs no work."""
    return (f"input slice hash and code version unchanged since run {entry['run_id']} "
            "(warehouse manifest)")


def publish_profiles(settings: EtlSettings) -> tuple[int, bool, str]:
    """Rebuild and export customer_profiles unless nothing changed: (rows, skipped, summary)."""
    # Decided read-only first: an unchanged re-run takes no write lock at all, so a user's
    # read-only connection to the warehouse (a notebook, the DuckDB CLI) does not block it.
    with warehouse.read_only(settings.duckdb_path, settings.lock_timeout_s,
                             settings.duckdb_limits) as con:
        if con is not None and not settings.force:
            shards_hash = _current_shards_hash(settings, con)
            previous = warehouse.read_profiles_manifest(con, settings.shard_count)
            if previous is not None and _profiles_unchanged(previous, shards_hash, settings):
                return int(previous["row_count"]), True, profile_summary(con)
    with warehouse.reader(settings.duckdb_path, settings.lock_timeout_s,
                          settings.duckdb_limits) as con:
        # Judged again under the write lock: a shard may have moved since.
        shards_hash = _current_shards_hash(settings, con)
        # Table, manifest and export change together or not at all (see the function).
        count = warehouse.publish_customer_profiles(
            con, settings.shard_count, settings.export_path,
            {"shards_hash": shards_hash, "code_version": _profiles_code()}, settings.hook)
        return count, False, profile_summary(con)


def _current_shards_hash(settings: EtlSettings, con: duckdb.DuckDBPyConnection) -> str:
    """The hash of every shard's manifest entry; ShardsNotCurrentError if one is not current.

    Never merge a partly updated set of shards: the previous table and export stay.
    """
    status = shard_status(settings, con)
    stale = [k for k, entry in status.items() if entry is None]
    if stale:
        raise ShardsNotCurrentError(
            f"shards {stale} are not current with the staged sources; "
            "materialize them first (customer_profiles left as it was)")
    # Every shard is current here, so its status entry is its manifest entry.
    return _shards_hash(status)


PROFILES_SKIP_REASON = ("every shard and the code are unchanged since the last rebuild, and the "
                        "export on disk is the one it wrote (sha256)")


def _shards_hash(manifest: dict[int, dict]) -> str:
    """One hash over every shard's manifest entry: what customer_profiles is built from."""
    text = "|".join(f"{k}:{e['source_data_hash']}:{e['code_version']}:{e['record_count']}"
                    for k, e in sorted(manifest.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _profiles_code() -> str:
    """The code that shapes the table and the export: our rules and DuckDB's CSV writer."""
    return f"{CODE_VERSION}-duckdb{duckdb.__version__}"


def _profiles_unchanged(previous: dict, shards_hash: str, settings: EtlSettings) -> bool:
    """True if the last rebuild used these shards and code and its export is still intact."""
    export = Path(settings.export_path)
    return ((previous["shards_hash"], previous["code_version"], previous["export_path"])
            == (shards_hash, _profiles_code(), settings.export_path)
            and export.is_file() and file_sha256(export) == previous["export_sha256"])


def profile_summary(con) -> str:
    """Markdown: churn and expansion distribution, average health, rejected rows per source."""
    rows = con.execute(
        f"""SELECT churn_risk, count(*), round(avg(health_score), 1)
            FROM {warehouse.ALIAS}.customer_profiles GROUP BY churn_risk ORDER BY churn_risk"""
    ).fetchall()
    rejected = con.execute(
        f"SELECT source, count(*) FROM {warehouse.ALIAS}.rejected_rows GROUP BY source ORDER BY source"
    ).fetchall()
    lines = ["| churn_risk | customers | avg health |", "|---|---|---|"]
    lines += [f"| {risk} | {n} | {avg} |" for risk, n, avg in rows]
    lines += ["", "| source | rejected rows |", "|---|---|"]
    lines += [f"| {source} | {n} |" for source, n in rejected] or ["| (none) | 0 |"]
    return "\n".join(lines)
