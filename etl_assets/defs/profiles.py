"""`shard_profiles` (one partition per shard) and `customer_profiles` (the merged table and
its export): thin bodies around the library's `build_shard` and `publish_profiles`."""


import time
from collections.abc import Iterator

import dagster as dg

from etl_assets.defs.checks import check_results, profile_check_specs
from etl_assets.defs.contracts import (
    COLUMN_SCHEMA,
    ROW_COUNT,
    names_for,
    not_retryable,
    shard_event,
    shard_partitions,
)
from etl_assets.defs.resources import STEP_CONCERNS, resource_keys, resources_of, step_settings
from etl_assets.lib import errors, freshness
from etl_assets.lib.checks import AuditFailedError
from etl_assets.lib.declaration import Declaration
from etl_assets.lib.freshness import PROFILES_SKIP_REASON, code_version
from etl_assets.lib.profiles import (
    ChaosFailure,
    ShardsNotCurrentError,
    build_shard,
    preview_columns,
    publish_profiles,
)
from etl_assets.lib.schema import profile_columns
from etl_assets.lib.settings import EtlSettings
from etl_assets.lib.staging import StagingError


# Retries live on the shard, not the orchestrator: waits of (2^n - 1) x SHARD_RETRY_DELAY_S
# (default 1 s), jittered.
def shard_retry_policy(delay_s: float) -> dg.RetryPolicy:
    """Three retries, exponential from `delay_s` (SHARD_RETRY_DELAY_S), jittered."""
    return dg.RetryPolicy(max_retries=3, delay=delay_s, backoff=dg.Backoff.EXPONENTIAL,
                          jitter=dg.Jitter.PLUS_MINUS)


def _shard_result(code: str, shard_id: int, attempt: int, elapsed_ms: int, records: int,
                  source_data_hash: str, **extra: object) -> dg.MaterializeResult:
    """A shard attempt's result: its data version is its input hash and the code version."""
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"{source_data_hash[:16]}-c{code}"),
        metadata={ROW_COUNT: int(records), "elapsed_ms": elapsed_ms, "attempt": attempt,
                  "shard_id": shard_id, "source_data_hash": source_data_hash, **extra},
    )


def _skipped(
    context: dg.AssetExecutionContext, code: str, shard_id: int, attempt: int, started: float,
    state: freshness.ShardState,
) -> dg.MaterializeResult:
    """Nothing to do: the warehouse already holds this shard from the same inputs and code."""
    reason, entry = state.reason, state.entry
    elapsed_ms = int((time.monotonic() - started) * 1000)
    shard_event(context, "shard_skip", shard_id=shard_id, attempt=attempt,
                record_count=entry["record_count"], elapsed_ms=elapsed_ms, reason=reason)
    return _shard_result(code, shard_id, attempt, elapsed_ms, entry["record_count"],
                         entry["source_data_hash"], skipped=True, skip_reason=reason)


def _preview_markdown(decl: Declaration, rows: list[tuple]) -> str:
    columns = preview_columns(decl)
    header = f"| {' | '.join(columns)} |\n|{'---|' * len(columns)}\n"
    return header + "".join(
        "| " + " | ".join("" if v is None else str(v) for v in row) + " |\n" for row in rows
    )


def _profile_column_schema(decl: Declaration) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(n, t) for n, t in profile_columns(decl)])


def build_profile_assets(
    settings: EtlSettings,
) -> tuple[dg.AssetsDefinition, dg.AssetsDefinition]:
    """The partitioned `shard_profiles` asset and the merged asset (`customer_profiles` when
    shipped) of the pipeline `settings` run."""
    shard_count, decl, names = settings.shard_count, settings.declaration, names_for(settings)
    code = code_version(decl)

    @dg.asset(
        key=names.shard_profiles,
        group_name=names.name("profiles"),
        partitions_def=shard_partitions(shard_count),
        # Not the four sources directly: their file-level versions would mark every partition
        # stale; shard_inputs has one version per shard (see shard_inputs.py).
        deps=[names.shard_inputs],
        retry_policy=shard_retry_policy(settings.shard_retry_delay_s),
        kinds={"duckdb"},
        owners=["team:data-platform"],
        code_version=code,
        description=(
            f"One partition per hash shard: merges the shard's {decl.key}s across the "
            f"{len(decl.sources)} sources ({', '.join(s.name for s in decl.sources)}), computes "
            f"{', '.join(d.name for d in decl.derived) or 'no derived column'}, and overwrites "
            "the shard's rows in DuckDB `shard_profiles` in one transaction."
        ),
        metadata={COLUMN_SCHEMA: _profile_column_schema(decl)},
        required_resource_keys=resource_keys(names, *STEP_CONCERNS),
    )
    def shard_profiles(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        settings = step_settings(context, shard_count, *resources_of(context, names, *STEP_CONCERNS))
        shard_id = int(context.partition_key)
        attempt = context.retry_number + 1
        started = time.monotonic()
        shard_event(context, "shard_start", shard_id=shard_id, attempt=attempt, run_id=context.run.run_id)
        try:
            if settings.chaos_fail_shard == shard_id and (
                settings.chaos_fail_mode == "always" or context.retry_number == 0
            ):
                raise ChaosFailure(f"chaos: shard {shard_id} fails on attempt {attempt}")
            # Not current under --force, nor for the chaos shard (see freshness).
            state = freshness.shard_state(settings, shard_id)
            if state.current:
                return _skipped(context, code, shard_id, attempt, started, state)
            result = build_shard(settings, shard_id, context.run.run_id)
        except (StagingError, errors.PathError, errors.MemoryLimitError) as exc:
            # Missing inputs, a bad path or a full disk: retrying in seconds would not help.
            shard_event(context, "shard_error", shard_id=shard_id, attempt=attempt,
                        error=str(exc), retryable=False)
            raise not_retryable(exc) from exc
        except Exception as exc:
            shard_event(context, "shard_error", shard_id=shard_id, attempt=attempt,
                        error=f"{type(exc).__name__}: {exc}", retryable=True)
            raise
        elapsed_ms = int((time.monotonic() - started) * 1000)
        shard_event(context, "shard_end", shard_id=shard_id, attempt=attempt,
                    record_count=result.record_count, elapsed_ms=elapsed_ms)
        return _shard_result(code, shard_id, attempt, elapsed_ms, result.record_count,
                             result.source_data_hash,
                             preview=dg.MetadataValue.md(_preview_markdown(decl, result.preview)),
                             # 0: DuckDB's default, one per core
                             duckdb_threads=settings.threads)

    @dg.asset(
        key=names.profiles,
        group_name=names.name("profiles"),
        deps=[shard_profiles],
        kinds={"duckdb", "csv"},
        owners=["team:data-platform"],
        code_version=code,
        description=(
            "Every shard merged into DuckDB `customer_profiles`, one row per idempotency key, "
            f"exported as CSV sorted by {decl.key} (EXPORT_PATH, default merged_output.csv), "
            "and copied with rejected_rows into the read-only warehouse.snapshot.duckdb."
        ),
        metadata={COLUMN_SCHEMA: _profile_column_schema(decl)},
        # Evaluated on the staged table and export before anything is published: a failed
        # check fails the step and leaves the previous table, export and snapshot.
        check_specs=profile_check_specs(names.profiles, decl.key),
        # Follows its shards by itself, once none is in progress and blocking checks passed.
        automation_condition=(
            dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
        ),
        required_resource_keys=resource_keys(names, *STEP_CONCERNS),
    )
    def customer_profiles(
        context: dg.AssetExecutionContext,
    ) -> Iterator[dg.AssetCheckResult | dg.MaterializeResult]:
        settings = step_settings(context, shard_count, *resources_of(context, names, *STEP_CONCERNS))
        try:
            published = publish_profiles(settings)
        except AuditFailedError as exc:
            # Reported first, so the UI shows which check failed; nothing was published.
            yield from check_results(exc.outcomes)
            raise not_retryable(exc) from exc
        except (errors.PathError, errors.MemoryLimitError, ShardsNotCurrentError) as exc:
            # A path to fix, a disk to free or shards to build first: waiting would not help.
            raise not_retryable(exc) from exc
        if published.skipped:
            context.log.info(f"{names.profiles.to_user_string()}: {PROFILES_SKIP_REASON}")
        yield dg.MaterializeResult(
            metadata={
                ROW_COUNT: published.rows,
                "export_path": dg.MetadataValue.path(settings.export_path),
                "snapshot_path": dg.MetadataValue.path(settings.snapshot_path),
                "summary": dg.MetadataValue.md(published.summary),
                "skipped": published.skipped,
                "skip_reason": PROFILES_SKIP_REASON if published.skipped else "",
            },
            check_results=check_results(published.checks),
        )

    return shard_profiles, customer_profiles


