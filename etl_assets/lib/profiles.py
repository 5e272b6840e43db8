"""Building profiles: one shard's merge and score, and the merged `customer_profiles` table
with its export, published all or nothing. Whether either is current: `freshness`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb

from etl_assets.lib import checks, ducklake, freshness, publish, staging, warehouse
from etl_assets.lib.checks import CheckOutcome
from etl_assets.lib.declaration import Declaration
from etl_assets.lib.faults import Hook
from etl_assets.lib.paths import duckdb_literals
from etl_assets.lib.profile_tables import PROFILES_TABLE
from etl_assets.lib.rules import DECLARATION, install_rules, merge_sql
from etl_assets.lib.settings import EtlSettings

log = logging.getLogger(__name__)


class ChaosFailure(RuntimeError):
    """The injected failure of the chaos drill (CHAOS_FAIL_SHARD)."""


class ShardsNotCurrentError(RuntimeError):
    """Some shards were not written from the current staged sources: nothing may be merged."""


class InputsMovedError(RuntimeError):
    """The sources were staged again while a shard was built from the previous slices.

    Retryable: the next attempt builds from the new slices (or finds them already written).
    """


@dataclass(frozen=True)
class ShardResult:
    """What one shard write produced."""

    shard_id: int
    record_count: int
    source_data_hash: str
    preview: list[tuple]


def preview_columns(decl: Declaration) -> tuple[str, ...]:
    """What a shard's preview shows: the key, the columns several sources share, the derived
    columns (the shipped pipeline: customer_id, email and its three scores)."""
    return (decl.key, *(column for column, _ in decl.prefer), *(d.name for d in decl.derived))


def build_shard(
    settings: EtlSettings,
    shard_id: int,
    run_id: str,
    hook: Hook | None = None,
) -> ShardResult:
    """Merge and score one shard's slices, then overwrite its rows in the warehouse.

    The rows are written only if the slices they came from are still the staged ones (see
    InputsMovedError): a run that read the slices just before another run staged new ones
    must not write its older rows over the newer rows that run may have written meanwhile.
    """
    hook = hook or settings.hook
    staged = staging.current_sources(settings)
    source_hash = staging.shard_input_hash(staged, shard_id)
    decl = settings.declaration
    with warehouse.scratch(settings.duckdb_limits) as con:
        install_rules(con, decl)
        # Views, not copies: the merge reads each slice once, straight from its Parquet file
        # (proven first: the file staged, by the sha256 recorded when it was written).
        for name, source in staged.items():
            con.read_parquet(duckdb_literals(staging.slices_to_read(source, shard_id))) \
                .create_view(name)
        con.execute(f"CREATE TEMP TABLE new_rows AS {merge_sql(decl)}", {"shard_id": shard_id})
        preview = con.execute(
            f"SELECT {', '.join(preview_columns(decl))} FROM new_rows ORDER BY {decl.key} LIMIT 5"
        ).fetchall()
        hook("shard_before_write")

        def still_current() -> None:
            # Judged again inside the write (under the file's lock; on DuckLake, a write of
            # this shard committed meanwhile makes ours conflict and ask again): if a write of
            # this shard built from a later staging has committed, the pointers no longer name
            # our slices, and our older rows must not replace its rows.
            now = staging.current_sources(settings)
            if staging.shard_input_hash(now, shard_id) != source_hash:
                raise InputsMovedError(
                    f"shard {shard_id}: the sources were staged again while it was built; its "
                    "rows were not written (the next attempt uses the new slices)")

        with warehouse.attached(con, settings.database, settings.lock_timeout_s,
                                settings.ducklake_data_path, decl):
            written = warehouse.overwrite_shard(
                con,
                "new_rows",
                shard_count=settings.shard_count,
                shard_id=shard_id,
                manifest={
                    "source_data_hash": source_hash,
                    "code_version": freshness.code_version(decl),
                    "run_id": run_id,
                },
                hook=hook,
                still_current=still_current,
            )
    return ShardResult(shard_id, written, source_hash, preview)


@dataclass(frozen=True)
class Published:
    """What publish_profiles left published: its rows, whether it was already current, a
    summary, and the blocking checks' outcomes on it."""

    rows: int
    skipped: bool
    summary: str
    checks: list[CheckOutcome]


def publish_profiles(settings: EtlSettings) -> Published:
    """Rebuild, export and snapshot customer_profiles unless `freshness` finds it current,
    publishing them only if the blocking checks pass on what was staged.

    A failed check raises checks.AuditFailedError (its `outcomes` say which): the previous
    table, export and snapshot stay byte-identical.
    """
    # Decided read-only first: an unchanged re-run takes no write lock at all, so a user's
    # read-only connection to the warehouse (a notebook, the DuckDB CLI) does not block it.
    with warehouse.read_only(settings.database, settings.lock_timeout_s,
                             settings.duckdb_limits) as con:
        if con is not None:
            state = freshness.profiles_state(settings, con)
            if state.stale_shards:
                raise _not_current(state.stale_shards)
            if state.damaged:
                log.warning(f"{state.damaged}: {state.reason}; publishing customer_profiles "
                            "again")
            if state.current:
                # Published after passing them; checked again as it is now (it may have been
                # changed by hand since), with the same checks.
                outcomes = checks.raise_if_failed(checks.profile_checks(
                    checks.published_facts(settings, con),
                    settings.shard_count))
                return Published(int(state.entry["row_count"]), True,
                                 profile_summary(con, settings.declaration,
                                                 settings.profiles_table), outcomes)
    # On DuckLake another publisher can commit first: the whole publish runs again.
    return ducklake.retry_conflicts(lambda: _publish(settings), "customer_profiles")


def _publish(settings: EtlSettings) -> Published:
    decl = settings.declaration
    with warehouse.reader(settings.database, settings.lock_timeout_s,
                          settings.duckdb_limits, settings.ducklake_data_path, decl) as con:
        # Judged again under the write lock: a shard may have moved since. Never merge a partly
        # updated set of shards: the previous table, export and snapshot stay.
        shards = freshness.shard_states(freshness.without_overrides(settings), con)
        stale = [k for k, state in shards.items() if not state.current]
        if stale:
            raise _not_current(stale)
        judged = {k: state.entry for k, state in shards.items()}

        def built_from(manifest: dict[int, dict]) -> None:
            # DuckLake: a shard may have committed between the judgement above and the
            # snapshot's read of the rows; then the publish starts again and judges anew.
            if manifest != judged:
                raise ducklake.ChangedMeanwhile("shards changed while customer_profiles was built")

        # Table, manifest, export and snapshot change together or not at all, and only once
        # the checks passed on the staged table and export (see the function).
        outcomes, audit = checks.auditor(settings)
        summary: list[str] = []

        def audit_and_summarize(con: duckdb.DuckDBPyConnection,
                                export: Callable[[], Path]) -> None:
            def summary_then_export() -> Path:
                # The export is the audit's last fact, waited for while it is still being
                # written: the summary is read meanwhile, from the staged table this
                # transaction commits.
                summary.append(profile_summary(con, decl, settings.profiles_table))
                return export()
            audit(con, summary_then_export)

        count = publish.publish_customer_profiles(
            con, publish.Targets.of(settings),
            {"shards_hash": freshness.shards_hash(shards),
             "code_version": freshness.profiles_code(decl)}, settings.hook, built_from,
            audit=audit_and_summarize)
        return Published(count, False, summary[0] if summary
                         else profile_summary(con, decl, settings.profiles_table), outcomes)


def _not_current(stale: Iterable[int]) -> ShardsNotCurrentError:
    return ShardsNotCurrentError(
        f"shards {list(stale)} are not current with the staged sources; "
        "materialize them first (customer_profiles left as it was)")


def profile_summary(con, decl: Declaration = DECLARATION, table: str = PROFILES_TABLE) -> str:
    """Markdown: rows by the first text derived column (the shipped pipeline: churn_risk) with
    the average of the first numeric one (health_score), and rejected rows per source."""
    text = [d.name for d in decl.derived if d.sql_type == "VARCHAR"]
    numbers = [d.name for d in decl.derived
               if d.sql_type.startswith(("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT",
                                         "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT",
                                         "FLOAT", "DOUBLE", "DECIMAL"))]
    by = text[0] if text else "NULL"
    average = f"round(avg({numbers[0]}), 1)" if numbers else "NULL"
    rows = con.execute(
        f"""SELECT {by}, count(*), {average}
            FROM {warehouse.ALIAS}.{table} GROUP BY ALL ORDER BY 1"""
    ).fetchall()
    rejected = con.execute(
        f"SELECT source, count(*) FROM {warehouse.ALIAS}.rejected_rows GROUP BY source ORDER BY source"
    ).fetchall()
    lines = [f"| {text[0] if text else 'all'} | {decl.key}s | "
             f"avg {numbers[0] if numbers else '-'} |", "|---|---|---|"]
    lines += [f"| {risk} | {n} | {avg} |" for risk, n, avg in rows]
    lines += ["", "| source | rejected rows |", "|---|---|"]
    lines += [f"| {source} | {n} |" for source, n in rejected] or ["| (none) | 0 |"]
    return "\n".join(lines)
