"""The four source assets: each calls the library to read its CSV with the typed schema,
quarantine bad rows and stage one slice per shard, then reports and checks what it staged."""


from pathlib import Path

import dagster as dg

from etl_assets.defs.contracts import (
    COLUMN_SCHEMA,
    RETRYABLE,
    ROW_COUNT,
    PipelineNames,
    names_for,
    not_retryable,
)
from etl_assets.defs.resources import STEP_CONCERNS, resource_keys, resources_of, step_settings
from etl_assets.lib import errors
from etl_assets.lib.checks import source_checks
from etl_assets.lib.files import SourceChangedError
from etl_assets.lib.freshness import SOURCE_SKIP_REASON, staging_code
from etl_assets.lib.schema import SourceSchema
from etl_assets.lib.settings import EtlSettings
from etl_assets.lib.sources import stage_source
from etl_assets.lib.validation import SourceFileError


def _column_schema(schema: SourceSchema) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                c.name,
                c.sql_type,
                description=(f"one of: {', '.join(c.domain)}" if c.domain else None),
            )
            for c in schema.columns
        ]
    )


def build_source_asset(schema: SourceSchema, shard_count: int, names: PipelineNames,
                       staging_code_: str) -> dg.AssetsDefinition:
    """The asset for one source file, with its two checks (rows accounted, reject rate)."""
    key = names.key(schema.name)
    accounted = dg.AssetCheckSpec(
        "rows_accounted", asset=key, blocking=True,
        description="rows read = rows accepted + rows rejected, and the staged slices hold "
        "exactly the accepted rows")
    reject_rate = dg.AssetCheckSpec(
        "reject_rate", asset=key, blocking=True,
        description="invalid rows (superseded duplicates aside) within MAX_REJECT_FRACTION")

    @dg.asset(
        key=key,
        group_name=names.name("sources"),
        kinds={"csv", "duckdb"},
        owners=["team:data-platform"],
        code_version=staging_code_,
        description=(
            f"{schema.description} Reads `{schema.filename}` under DATA_DIR with a typed schema, "
            "quarantines bad rows in `rejected_rows`, and stages one Parquet slice per shard."
        ),
        metadata={COLUMN_SCHEMA: _column_schema(schema), "file": schema.filename},
        check_specs=[accounted, reject_rate],
        required_resource_keys=resource_keys(names, *STEP_CONCERNS),
    )
    def _source(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        settings = step_settings(context, shard_count, *resources_of(context, names, *STEP_CONCERNS))
        try:
            result = stage_source(schema, settings)
        except (SourceFileError, errors.PathError, errors.MemoryLimitError) as exc:
            context.log.debug(f"{schema.name}: file error", exc_info=True)
            raise not_retryable(exc) from exc
        except SourceChangedError as exc:
            # Nothing was staged; the next run (or a retry) reads the file once it is complete.
            raise dg.Failure(description=str(exc), metadata={RETRYABLE: True}) from exc
        report = result.report
        for column in report.extra_columns:
            context.log.warning(f"{schema.filename}: ignoring extra column {column!r}")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(result.staged.file_sha256),
            metadata={
                ROW_COUNT: report.accepted,
                "rows_read": report.rows_read,
                "rows_accepted": report.accepted,
                "rows_rejected": report.rejected,
                "reject_reasons": dict(report.reasons.most_common()),
                "file_sha256": result.staged.file_sha256,
                "file_path": str(Path(settings.data_dir) / schema.filename),
                "staged_version": result.staged.version_dir,
                "elapsed_ms": result.elapsed_ms,
                "skipped": result.skipped,
                "skip_reason": SOURCE_SKIP_REASON if result.skipped else "",
            },
            check_results=[
                dg.AssetCheckResult(check_name=c.name, passed=c.passed, metadata=c.metadata,
                                    description=c.description)
                for c in source_checks(schema, report, result.staged, settings)],
        )

    return _source



def build_source_assets(settings: EtlSettings) -> list[dg.AssetsDefinition]:
    """One asset per source file of the pipeline `settings` run, staging for its shard count."""
    decl, names = settings.declaration, names_for(settings)
    return [build_source_asset(schema, settings.shard_count, names, staging_code(decl))
            for schema in decl.sources]
