"""`shard_profiles` (one partition per shard) and `customer_profiles` (the merged table + export)."""


import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import dagster as dg
import duckdb

from etl_assets import errors, staging, warehouse
from etl_assets.faults import Hook
from etl_assets.logs import shard_event
from etl_assets.paths import duckdb_literals
from etl_assets.rules import install_rules, merge_sql
from etl_assets.schema import SOURCES, profile_columns
from etl_assets.settings import EtlSettings
from etl_assets.shard_inputs import SHARD_INPUTS
from etl_assets.validation import file_sha256
from etl_assets.sharding import shard_partitions

# The job that runs one shard partition (the CLI's unit of work; also launchable in the UI).
SHARDS_JOB = "shards_job"

# Bump when the rows a shard writes would change for the same input (rules, merge, columns).
CODE_VERSION = "1"

# Retries live on the shard, not the orchestrator: waits of (2^n - 1) x 1 s, jittered +/- 1 s.
SHARD_RETRY_POLICY = dg.RetryPolicy(
    max_retries=3, delay=1.0, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


class ChaosFailure(RuntimeError):
    """The injected failure of the chaos drill (CHAOS_FAIL_SHARD)."""


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


def build_shard(
    settings: EtlSettings,
    shard_id: int,
    run_id: str,
    hook: Optional[Hook] = None,
) -> ShardResult:
    """Merge and score one shard's slices, then overwrite its rows in the warehouse.

    The rows are written only if the slices they came from are still the staged ones (see
    InputsMovedError): a run that read the slices just before another run staged new ones
    must not write its older rows over the newer rows that run may have written meanwhile.
    """
    hook = hook or settings.hook
    staged = staging.current_sources(settings.staging_dir, list(SOURCES), settings.shard_count)
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
        hook("shard_before_write")
        with warehouse.attached(con, settings.duckdb_path, settings.lock_timeout_s):
            # Judged again under the warehouse lock, which every shard write holds: if a write
            # of this shard built from a later staging has committed, the pointers no longer
            # name our slices, and our older rows must not replace its rows.
            now = staging.current_sources(settings.staging_dir, list(SOURCES),
                                          settings.shard_count)
            if staging.shard_input_hash(now, shard_id) != source_hash:
                raise InputsMovedError(
                    f"shard {shard_id}: the sources were staged again while it was built; its "
                    "rows were not written (the next attempt uses the new slices)")
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
                hook=hook,
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
    staged = staging.current_sources(settings.staging_dir, list(SOURCES), settings.shard_count)
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


def _skipped(
    context: dg.AssetExecutionContext, shard_id: int, attempt: int, started: float, entry: dict
) -> dg.MaterializeResult:
    """Nothing to do: the warehouse already holds this shard from the same inputs and code."""
    reason = skip_reason(entry)
    elapsed_ms = int((time.monotonic() - started) * 1000)
    shard_event(context, "shard_skip", shard_id=shard_id, attempt=attempt,
                record_count=entry["record_count"], elapsed_ms=elapsed_ms, reason=reason)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"{entry['source_data_hash'][:16]}-c{CODE_VERSION}"),
        metadata={
            "dagster/row_count": int(entry["record_count"]),
            "elapsed_ms": elapsed_ms,
            "attempt": attempt,
            "shard_id": shard_id,
            "source_data_hash": entry["source_data_hash"],
            "skipped": True,
            "skip_reason": reason,
        },
    )


def _preview_markdown(rows: list[tuple]) -> str:
    header = "| customer_id | email | health | churn | expansion |\n|---|---|---|---|---|\n"
    return header + "".join(
        "| " + " | ".join("" if v is None else str(v) for v in row) + " |\n" for row in rows
    )


def _profile_column_schema() -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(n, t) for n, t in profile_columns()])


def build_profile_assets(shard_count: int) -> tuple[dg.AssetsDefinition, dg.AssetsDefinition]:
    """The partitioned `shard_profiles` asset and the merged `customer_profiles` asset."""

    @dg.asset(
        name="shard_profiles",
        group_name="profiles",
        partitions_def=shard_partitions(shard_count),
        # Not the four sources directly: their file-level versions would mark every partition
        # stale; shard_inputs has one version per shard (see shard_inputs.py).
        deps=[SHARD_INPUTS],
        retry_policy=SHARD_RETRY_POLICY,
        kinds={"duckdb"},
        owners=["team:data-platform"],
        code_version=CODE_VERSION,
        description=(
            "One partition per hash shard: merges the shard's customers across the four sources "
            "(CRM owns identity), scores health / churn / expansion, and overwrites the shard's "
            "rows in DuckDB `shard_profiles` in one transaction."
        ),
        metadata={"dagster/column_schema": _profile_column_schema()},
    )
    def shard_profiles(
        context: dg.AssetExecutionContext, settings: EtlSettings
    ) -> dg.MaterializeResult:
        shard_id = int(context.partition_key)
        attempt = context.retry_number + 1
        started = time.monotonic()
        shard_event(context, "shard_start", shard_id=shard_id, attempt=attempt, run_id=context.run.run_id)
        try:
            if settings.chaos_fail_shard == shard_id and (
                settings.chaos_fail_mode == "always" or context.retry_number == 0
            ):
                raise ChaosFailure(f"chaos: shard {shard_id} fails on attempt {attempt}")
            # The chaos shard always does real work: the drill is about retrying real work.
            recompute = settings.force or settings.chaos_fail_shard == shard_id
            unchanged = None if recompute else shard_status(settings).get(shard_id)
            if unchanged is not None:
                return _skipped(context, shard_id, attempt, started, unchanged)
            result = build_shard(settings, shard_id, context.run.run_id)
        except (staging.StagingError, errors.PathError) as exc:
            # Missing inputs, a bad path or a full disk: retrying in seconds would not help.
            shard_event(context, "shard_error", shard_id=shard_id, attempt=attempt,
                        error=str(exc), retryable=False)
            raise dg.Failure(
                description=str(exc), allow_retries=False, metadata={"retryable": False}
            ) from exc
        except Exception as exc:
            shard_event(context, "shard_error", shard_id=shard_id, attempt=attempt,
                        error=f"{type(exc).__name__}: {exc}", retryable=True)
            raise
        elapsed_ms = int((time.monotonic() - started) * 1000)
        shard_event(context, "shard_end", shard_id=shard_id, attempt=attempt,
                    record_count=result.record_count, elapsed_ms=elapsed_ms)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(f"{result.source_data_hash[:16]}-c{CODE_VERSION}"),
            metadata={
                "dagster/row_count": result.record_count,
                "elapsed_ms": elapsed_ms,
                "attempt": attempt,
                "shard_id": shard_id,
                "source_data_hash": result.source_data_hash,
                "preview": dg.MetadataValue.md(_preview_markdown(result.preview)),
            },
        )

    @dg.asset(
        name="customer_profiles",
        group_name="profiles",
        deps=[shard_profiles],
        kinds={"duckdb", "csv"},
        owners=["team:data-platform"],
        code_version=CODE_VERSION,
        description=(
            "Every shard merged into DuckDB `customer_profiles`, one row per idempotency key, "
            "exported as CSV sorted by customer_id (EXPORT_PATH, default merged_output.csv), "
            "and copied with rejected_rows into the read-only warehouse.snapshot.duckdb."
        ),
        metadata={"dagster/column_schema": _profile_column_schema()},
        # Follows its shards by itself, once none is in progress and blocking checks passed.
        automation_condition=(
            dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
        ),
    )
    def customer_profiles(
        context: dg.AssetExecutionContext, settings: EtlSettings
    ) -> dg.MaterializeResult:
        try:
            count, skipped, summary = _publish(settings)
        except errors.PathError as exc:
            # A path to fix or a disk to free: one line, and retrying at once would not help.
            raise dg.Failure(description=str(exc), allow_retries=False,
                             metadata={"retryable": False}) from exc
        if skipped:
            context.log.info(f"customer_profiles: {PROFILES_SKIP_REASON}")
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": count,
                "export_path": dg.MetadataValue.path(settings.export_path),
                "snapshot_path": dg.MetadataValue.path(settings.snapshot_path),
                "summary": dg.MetadataValue.md(summary),
                "skipped": skipped,
                "skip_reason": PROFILES_SKIP_REASON if skipped else "",
            }
        )

    return shard_profiles, customer_profiles


def _publish(settings: EtlSettings) -> tuple[int, bool, str]:
    """Rebuild, export and snapshot customer_profiles unless nothing changed:
    (rows, skipped, summary)."""
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
        # Table, manifest, export and snapshot change together or not at all (see the function).
        count = warehouse.publish_customer_profiles(
            con, settings.shard_count, settings.export_path, settings.snapshot_path,
            {"shards_hash": shards_hash, "code_version": _profiles_code()}, settings.hook)
        return count, False, profile_summary(con)


def _current_shards_hash(settings: EtlSettings, con: duckdb.DuckDBPyConnection) -> str:
    """The hash of every shard's manifest entry; a Failure if any shard is not current.

    Never merge a partly updated set of shards: the previous table and export stay.
    """
    status = shard_status(settings, con)
    stale = [k for k, entry in status.items() if entry is None]
    if stale:
        raise dg.Failure(
            description=f"shards {stale} are not current with the staged sources; "
            "materialize them first (customer_profiles left as it was)",
            allow_retries=False,
            metadata={"retryable": False},
        )
    # Every shard is current here, so its status entry is its manifest entry.
    return _shards_hash(status)


PROFILES_SKIP_REASON = ("every shard and the code are unchanged since the last rebuild, and the "
                        "export and snapshot on disk are the ones it wrote (sha256)")


def _shards_hash(manifest: dict[int, dict]) -> str:
    """One hash over every shard's manifest entry: what customer_profiles is built from."""
    text = "|".join(f"{k}:{e['source_data_hash']}:{e['code_version']}:{e['record_count']}"
                    for k, e in sorted(manifest.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _profiles_code() -> str:
    """The code that shapes the table and the export: our rules and DuckDB's CSV writer."""
    return f"{CODE_VERSION}-duckdb{duckdb.__version__}"


def _profiles_unchanged(previous: dict, shards_hash: str, settings: EtlSettings) -> bool:
    """True if the last rebuild used these shards and code, and its export and snapshot are
    still the files it wrote (a missing, edited or older one is written again)."""
    return ((previous["shards_hash"], previous["code_version"], previous["export_path"])
            == (shards_hash, _profiles_code(), settings.export_path)
            and _intact(settings.export_path, previous["export_sha256"])
            # Absent in a manifest written before snapshots existed: never intact then.
            and _intact(settings.snapshot_path, previous.get("snapshot_sha256")))


def _intact(path: str, sha256: Optional[str]) -> bool:
    """True if `path` is a file whose sha256 is `sha256` (hashed without opening it in DuckDB,
    so a reader holding the file never delays the decision)."""
    return sha256 is not None and Path(path).is_file() and file_sha256(path) == sha256


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
