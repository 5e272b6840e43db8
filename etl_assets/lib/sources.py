"""Staging a source: read the CSV with its typed schema, quarantine bad rows, route by shard.

Each source routes its rows to shards once; every shard then reads only its own slice, instead
of every shard re-reading every file. The source assets call `stage_source`; whether there is
anything to stage is decided by `freshness.source_state`, which the runner and the sensors ask
first.
"""


import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import duckdb

from etl_assets.lib import edits, errors, freshness, ownership, staging, warehouse
from etl_assets.lib.events import report_progress
from etl_assets.lib.faults import Hook
from etl_assets.lib.files import file_sha256, snapshot_file
from etl_assets.lib.paths import duckdb_literals
from etl_assets.lib.rules import install_rules
from etl_assets.lib.schema import SourceSchema
from etl_assets.lib.settings import EtlSettings
from etl_assets.lib.validation import (
    READ_CSV,
    ReadReport,
    SourceFileError,
    checked_select,
    duplicate_reason,
    read_csv_params,
    read_header,
    read_source,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceResult:
    """A staged source: the read report, the published slices and how long it took."""

    report: ReadReport
    staged: staging.StagedSource
    elapsed_ms: int
    skipped: bool = False


def stage_source(
    schema: SourceSchema, settings: EtlSettings, hook: Hook | None = None
) -> SourceResult:
    """Read, validate and stage one source; record its rejected rows in the warehouse.

    A file whose staging is reusable (`freshness.source_state`: same sha256, layout and staging
    code, proven by the warehouse) is not read again unless `settings.force`. Otherwise the
    file is copied to a private snapshot, hashed as it is copied, and only the snapshot is read:
    the staged version is named after exactly the bytes it was made from, even if the file
    changes meanwhile.
    """
    hook = hook or settings.hook
    started = time.monotonic()
    path = Path(settings.data_dir) / schema.filename
    if not path.is_file():
        raise SourceFileError(*_missing(path))
    state = freshness.source_state(schema, settings)
    if state.reusable:  # never under --force: an overridden state is not judged
        result = SourceResult(state.recorded, state.staged,
                              int((time.monotonic() - started) * 1000), True)
        _report_staged(schema, result)
        return result
    hook("source_after_hash")
    ownership.claim_folder(Path(settings.staging_dir), settings.pipeline_name)
    # Held until the end: the snapshot is moved into the version after it is published.
    with staging.temp_dir(settings.staging_dir, schema.name) as snapshot_dir:
        snapshot = snapshot_dir / schema.filename
        report_progress("source_copy", source=schema.name)
        with errors.naming(snapshot_dir):
            sha = snapshot_file(path, snapshot, hook)
        with warehouse.scratch(settings.duckdb_limits) as con:
            install_rules(con, settings.declaration)
            report_progress("source_validate", source=schema.name)
            clean = edits.stage_changed(con, snapshot, schema, settings, sha, hook) \
                or _stage_clean(con, snapshot, schema, settings, sha, hook)
            if clean is not None:
                report, staged = clean
            else:
                try:
                    report = read_source(con, snapshot, schema)
                except SourceFileError as exc:
                    raise SourceFileError(path, exc.problem) from None  # name the user's file
                report_progress("source_stage", source=schema.name, rows=report.accepted,
                                shards=settings.shard_count)
                staged = _write_slices(con, schema, settings, sha, hook)
            report_progress("source_rejected", source=schema.name, rows=report.rejected)
            hook("source_before_rejected")
            with warehouse.attached(con, settings.database, settings.lock_timeout_s,
                                    settings.ducklake_data_path, settings.declaration):
                warehouse.replace_rejected(con, schema.name, "rejected", sha, {
                    "staging_key": freshness.staging_key(settings),
                    "rows_read": report.rows_read,
                    "rows_accepted": report.accepted,
                    "rows_rejected": report.rejected,
                    "reasons": json.dumps(dict(sorted(report.reasons.items()))),
                }, hook)
            if report.rows_read == report.accepted and not report.extra_columns:
                # Clean: the next edit of this file can be staged from the records it changes.
                with errors.naming(Path(staged.version_dir)):
                    os.replace(snapshot, Path(staged.version_dir) / staging.RAW)
    result = SourceResult(report, staged, int((time.monotonic() - started) * 1000))
    _report_staged(schema, result)
    return result


def _report_staged(schema: SourceSchema, result: SourceResult) -> None:
    report_progress("source_staged", source=schema.name, rows=result.report.accepted,
                    rejected=result.report.rejected, elapsed_ms=result.elapsed_ms)


def _missing(path: Path) -> tuple[Path, str]:
    """(path, problem) for a source file that is not a regular file: say what is there instead."""
    if path.is_dir():
        return path, "is a directory"
    if path.parent.exists() and not path.parent.is_dir():
        return path.parent, "data directory is a file, not a directory"
    if path.exists():
        return path, "is not a regular file"
    return path, "file not found"


def _routed_sql(schema: SourceSchema) -> str:
    return (
        f"SELECT {', '.join(schema.column_names)}, row_hash, "
        f"etl_shard({schema.key}, $n) AS shard_id FROM accepted"
    )


def slice_stats(
    con: duckdb.DuckDBPyConnection, schema: SourceSchema, shard_count: int
) -> tuple[dict[int, str], dict[int, int]]:
    """Per-shard slice hash and row count of the `accepted` rows (after `read_source`)."""
    return staging.slice_stats_of(con, _routed_sql(schema), {"n": shard_count}, shard_count)


def plan_slices(schema: SourceSchema, settings: EtlSettings) -> tuple[str, dict[int, str]]:
    """(file sha256, per-shard slice hashes) of the file as it is now; writes nothing."""
    path = Path(settings.data_dir) / schema.filename
    sha = file_sha256(path)
    with warehouse.scratch(settings.duckdb_limits) as con:
        install_rules(con, settings.declaration)
        read_source(con, path, schema)
        hashes, _ = slice_stats(con, schema, settings.shard_count)
    return sha, hashes


def _write_slices(
    con: duckdb.DuckDBPyConnection, schema: SourceSchema, settings: EtlSettings, sha: str,
    hook: Hook,
) -> staging.StagedSource:
    n = settings.shard_count
    version_dir = (Path(settings.staging_dir) / schema.name
                   / f"{sha[:20]}-{freshness.staging_key(settings)}")
    existing = version_dir.is_dir()
    # A full disk or a bad path while staging names the source's staging folder.
    with errors.naming(Path(settings.staging_dir) / schema.name):
        current = staging.current_version(settings, schema.name) \
            if existing and not settings.force else None
        if current is not None and Path(current.version_dir).name == version_dir.name \
                and staging.proven_slices(current) is not None:
            # Published earlier under this name. The name alone proves nothing (a version
            # staged by older code, or damaged on disk, keeps it): it is reused only if it is
            # the current version, its files are the ones staged (their recorded sha256) and
            # they hold exactly the rows just read, shard by shard.
            slice_hashes, slice_rows = staging.staged_stats(con, version_dir, n)
            if (slice_hashes, slice_rows) == slice_stats(con, schema, n):
                staged = staging.StagedSource(schema.name, sha, n, str(version_dir),
                                              slice_hashes, slice_rows, current.file_sha256s)
                return staging.publish(settings.staging_dir, None, staged, hook)
        with staging.temp_dir(settings.staging_dir, schema.name) as tmp:
            return _stage_into(con, schema, settings, sha, tmp, version_dir, hook,
                               replace=existing)


def _stage_into(
    con: duckdb.DuckDBPyConnection, schema: SourceSchema, settings: EtlSettings, sha: str,
    tmp: Path, version_dir: Path, hook: Hook, replace: bool,
) -> staging.StagedSource:
    """Write every slice into `tmp`, then publish it as `version_dir`."""
    n = settings.shard_count
    # One pass routes and writes every shard's slice (shard_id=<k>/ folders); the stats are then
    # read back from the files' row_hash column, which is cheaper than routing every row again.
    con.execute(
        f"COPY ({_routed_sql(schema)}) TO $path (FORMAT parquet, PARTITION_BY (shard_id))",
        {"path": str(tmp), "n": n},
    )
    slice_hashes, slice_rows = staging.staged_stats(con, tmp, n)
    return _publish_slices(con, schema, settings, sha, tmp, version_dir, hook, replace,
                           slice_hashes, slice_rows,
                           (f"SELECT * EXCLUDE (shard_id) FROM ({_routed_sql(schema)})", {"n": n}))


def _publish_slices(
    con: duckdb.DuckDBPyConnection, schema: SourceSchema, settings: EtlSettings, sha: str,
    tmp: Path, version_dir: Path, hook: Hook, replace: bool, slice_hashes: dict[int, str],
    slice_rows: dict[int, int], rows_like: tuple[str, dict[str, object]],
) -> staging.StagedSource:
    """Give every empty shard an empty slice in `tmp` (with the columns of the query
    `rows_like`, and its parameters), then publish `tmp` as `version_dir`."""
    n = settings.shard_count
    # Empty shards get an empty file with the schema so every shard can read its slice.
    rows_sql, params = rows_like
    for k in range(n):
        if slice_rows[k] == 0:
            folder = tmp / f"shard_id={k}"
            folder.mkdir()
            con.execute(f"COPY (SELECT * FROM ({rows_sql}) LIMIT 0) TO $path (FORMAT parquet)",
                        {**params, "path": str(folder / "empty.parquet")})
    staged = staging.StagedSource(schema.name, sha, n, str(version_dir), slice_hashes, slice_rows)
    return staging.publish(settings.staging_dir, tmp, staged, hook, replace=replace)


# The partition a row that is not clean goes to (see _stage_clean): never a shard.
_NOT_CLEAN = -1


def _stage_clean(
    con: duckdb.DuckDBPyConnection, path: Path, schema: SourceSchema, settings: EtlSettings,
    sha: str, hook: Hook,
) -> tuple[ReadReport, staging.StagedSource] | None:
    """Validate, route and stage the file at `path` in one streaming pass, if it turns out to
    have nothing to quarantine; else None, with nothing staged.

    The pass runs the one validation query (`checked_select`) straight from the CSV reader into
    the slices, without the two in-memory copies of the file (raw text, then checked rows) that
    quarantining needs: at 10M rows those copies outgrow the memory limit and spill. A row with
    a reason goes to a partition no shard reads; the file is clean when that partition is
    empty, the reader refused no record and no key repeats. Otherwise (and when the
    version folder already exists: its reuse is proven row by row) the caller takes the full
    path, which quarantines exactly as always: the same rows, slices and reasons either way.
    """
    n = settings.shard_count
    version_dir = (Path(settings.staging_dir) / schema.name
                   / f"{sha[:20]}-{freshness.staging_key(settings)}")
    if version_dir.is_dir():
        return None
    try:
        columns, extra = read_header(path, schema)
    except SourceFileError:
        return None  # the full path says what is wrong, naming the user's file
    if extra:
        # Columns no query reads are not decoded, so a bad byte there would go unseen: only
        # the full path, which keeps each row's raw text, quarantines it.
        return None
    select, params = checked_select(con, schema, f"SELECT 0 AS rec, * FROM {READ_CSV}")
    with errors.naming(Path(settings.staging_dir) / schema.name), \
            staging.temp_dir(settings.staging_dir, schema.name) as tmp:
            try:
                con.execute(
                    f"""COPY (SELECT {', '.join(schema.column_names)}, row_hash,
                                     CASE WHEN reason IS NULL THEN etl_shard({schema.key}, $n)
                                          ELSE $not_clean END AS shard_id
                              FROM ({select}))
                        TO $out (FORMAT parquet, PARTITION_BY (shard_id))""",
                    {**params, **read_csv_params(path, columns), "n": n,
                     "not_clean": _NOT_CLEAN, "out": str(tmp)})
            except duckdb.Error:
                # Not a CSV it can read: the full path says why, in one line.
                staging.discard_pass(con, tmp)
                return None
            refused = con.execute("SELECT count(*) FROM csv_rejects").fetchone()[0]
            files = sorted(str(p) for p in tmp.glob("shard_id=*/*.parquet"))
            clean = not refused and files and not (tmp / f"shard_id={_NOT_CLEAN}").exists()
            rows = distinct = 0
            if clean:
                rows, distinct = con.execute(
                    f"SELECT count(*), count(DISTINCT {schema.key}) FROM read_parquet($files, "
                    "hive_partitioning = false)", {"files": duckdb_literals(files)}).fetchone()
            if not clean or rows != distinct:
                staging.discard_pass(con, tmp)
                return None
            report_progress("source_stage", source=schema.name, rows=int(rows), shards=n)
            slice_hashes, slice_rows = staging.staged_stats(con, tmp, n)
            con.execute("CREATE OR REPLACE TEMP TABLE rejected (line_number BIGINT, "
                        f"{schema.key} VARCHAR, reason VARCHAR, raw VARCHAR)")
            staged = _publish_slices(
                con, schema, settings, sha, tmp, version_dir, hook, False, slice_hashes,
                slice_rows, ("SELECT * FROM read_parquet($files, hive_partitioning = false)",
                             {"files": duckdb_literals(files)}))
    return ReadReport(int(rows), int(rows), 0, Counter(), extra,
                      duplicate_reason(schema.key)), staged


# The changed stretch of an edited file up to which only it is staged again (a larger edit
# costs about as much as reading the whole file).
def read_shard_inputs(settings: EtlSettings) -> dict[int, tuple[str, dict[str, int]]]:
    """Per shard: (its input hash, rows per source) from the current staged pointers."""
    staged = staging.current_sources(settings)
    return {
        k: (staging.shard_input_hash(staged, k),
            {name: int(source.slice_rows[k]) for name, source in staged.items()})
        for k in settings.shard_ids
    }
