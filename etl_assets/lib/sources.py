"""Staging a source: read the CSV with its typed schema, quarantine bad rows, route by shard.

Each source routes its rows to shards once; every shard then reads only its own slice, instead
of every shard re-reading every file. The source assets call `stage_source`; the runner and the
sensors ask `source_unchanged` first.
"""


import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import duckdb

from etl_assets.lib import errors, staging, warehouse
from etl_assets.lib.paths import duckdb_literals
from etl_assets.lib.rules import install_rules
from etl_assets.lib.schema import SourceSchema
from etl_assets.lib.settings import EtlSettings
from etl_assets.lib.faults import Hook
from etl_assets.lib.validation import (
    ReadReport,
    SourceChangedError,
    SourceFileError,
    file_sha256,
    read_source,
    snapshot_file,
)

# Bump when staging output would change for the same input (types, validation, hashing).
STAGING_VERSION = "3"


@dataclass(frozen=True)
class SourceResult:
    """A staged source: the read report, the published slices and how long it took."""

    report: ReadReport
    staged: staging.StagedSource
    elapsed_ms: int
    skipped: bool = False


def _staging_key(settings: EtlSettings) -> str:
    return f"n{settings.shard_count}-v{STAGING_VERSION}"


def _unchanged(
    schema: SourceSchema, settings: EtlSettings, sha: str
) -> Optional[tuple[ReadReport, staging.StagedSource]]:
    """The previous result if this exact file was staged and recorded for this layout.

    Both halves are checked: the staged pointer on disk and the manifest row the warehouse
    committed with the rejected rows, so a deleted or replaced warehouse forces a re-read.
    """
    try:
        staged = staging.read_pointer(settings.staging_dir, schema.name)
    except staging.StagingError:
        return None
    if staged.file_sha256 != sha or staged.shard_count != settings.shard_count or not \
            Path(staged.version_dir).name.endswith(_staging_key(settings)):
        return None
    with warehouse.read_only(settings.duckdb_path, settings.lock_timeout_s) as con:
        if con is None:
            return None
        row = warehouse.read_source_manifest(con, schema.name)
        # The version's files must still hold the rows recorded for it (Parquet footers only).
        on_disk = _staged_rows(con, staged)
    if row is None or (row["file_sha256"], row["staging_key"]) != (sha, _staging_key(settings)):
        return None
    if on_disk != staged.slice_rows or sum(on_disk.values()) != row["rows_accepted"]:
        return None
    report = ReadReport(row["rows_read"], row["rows_accepted"], row["rows_rejected"],
                        Counter(json.loads(row["reasons"])))
    return report, staged


SOURCE_SKIP_REASON = ("file sha256, shard layout and staging code unchanged since the last "
                      "staging (checked against the warehouse manifest)")


@dataclass(frozen=True)
class CheckOutcome:
    """One check's verdict, with what it compared (the source assets report it to Dagster)."""

    name: str
    passed: bool
    metadata: dict
    description: Optional[str] = None


def source_checks(
    schema: SourceSchema, report: ReadReport, staged: staging.StagedSource,
    settings: EtlSettings,
) -> list[CheckOutcome]:
    """The source's two blocking checks (rows accounted, reject rate) for a read report and
    the version it staged."""
    staged_rows = sum(staged.slice_rows.values())
    return [
        CheckOutcome(
            name="rows_accounted",
            # Rows read from the file = accepted + rejected, and the staged slices (counted
            # from their files) hold exactly the accepted rows: a staging that does not match
            # the read it is recorded for fails here, not silently downstream.
            passed=report.rows_read == report.accepted + report.rejected
            and staged_rows == report.accepted,
            metadata={"read": report.rows_read, "accepted": report.accepted,
                      "rejected": report.rejected, "staged": staged_rows},
        ),
        CheckOutcome(
            name="reject_rate",
            passed=report.invalid_fraction <= settings.max_reject_fraction,
            metadata={
                "invalid": report.invalid,
                "duplicates": report.rejected - report.invalid,
                "read": report.rows_read,
                "fraction": round(report.invalid_fraction, 6),
                "max_fraction": settings.max_reject_fraction,
                "top_reason": report.top_reason or "",
            },
            description=(
                f"{schema.name}: {report.invalid} of {report.rows_read} rows rejected as "
                f"invalid ({report.invalid_fraction:.1%}, limit "
                f"{settings.max_reject_fraction:.1%})"
                + (f", most often {report.top_reason}" if report.top_reason else "")
            ),
        ),
    ]


def source_unchanged(schema: SourceSchema, settings: EtlSettings) -> bool:
    """True if staging this source now would find nothing to do (see `stage_source`) and its
    checks, judged on the recorded figures with today's settings, pass.

    A missing file counts as changed, so that the source's own step reports it; so does a
    source whose checks would fail, so that its step blocks what depends on it again.
    """
    path = Path(settings.data_dir) / schema.filename
    if settings.force or not path.is_file():
        return False
    try:
        staging.pointer_mtime_ns(settings.staging_dir, schema.name)
    except OSError:
        return False  # never staged: no need to hash the file to know
    previous = _unchanged(schema, settings, file_sha256(path))
    return previous is not None and all(
        check.passed for check in source_checks(schema, *previous, settings))


def stage_source(
    schema: SourceSchema, settings: EtlSettings, hook: Optional[Hook] = None
) -> SourceResult:
    """Read, validate and stage one source; record its rejected rows in the warehouse.

    An unchanged file (same sha256, layout and staging code, proven by the warehouse) is not
    read again unless `settings.force`. Otherwise the file is copied to a private snapshot,
    hashed as it is copied, and only the snapshot is read: the staged version is named after
    exactly the bytes it was made from, even if the file changes meanwhile.
    """
    hook = hook or settings.hook
    started = time.monotonic()
    path = Path(settings.data_dir) / schema.filename
    if not path.is_file():
        raise SourceFileError(*_missing(path))
    sha = file_sha256(path)
    previous = None if settings.force else _unchanged(schema, settings, sha)
    if previous is not None:
        report, staged = previous
        return SourceResult(report, staged, int((time.monotonic() - started) * 1000), True)
    hook("source_after_hash")
    snapshot_dir = staging.new_temp_dir(settings.staging_dir, schema.name)
    try:
        snapshot = snapshot_dir / schema.filename
        with errors.naming(snapshot_dir):
            sha = snapshot_file(path, snapshot, hook)
        with warehouse.scratch(settings.duckdb_limits) as con:
            install_rules(con)
            try:
                report = read_source(con, snapshot, schema)
            except SourceFileError as exc:
                raise SourceFileError(path, exc.problem) from None  # name the user's file
            staged = _write_slices(con, schema, settings, sha, hook)
            hook("source_before_rejected")
            with warehouse.attached(con, settings.duckdb_path, settings.lock_timeout_s):
                warehouse.replace_rejected(con, schema.name, "rejected", sha, {
                    "staging_key": _staging_key(settings),
                    "rows_read": report.rows_read,
                    "rows_accepted": report.accepted,
                    "rows_rejected": report.rejected,
                    "reasons": json.dumps(dict(sorted(report.reasons.items()))),
                }, hook)
    finally:
        shutil.rmtree(snapshot_dir, ignore_errors=True)
    return SourceResult(report, staged, int((time.monotonic() - started) * 1000))


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
        "etl_shard(customer_id, $n) AS shard_id FROM accepted"
    )


# A slice hash sums the rows' md5s (as two 64-bit halves): independent of row order, so a
# shuffled file with the same rows gives the same slices, and no sort is needed. The one
# definition, used on the routed rows before staging and on the staged files after it.
_SLICE_STATS = """SELECT shard_id, count(*), md5(count(*) || ':'
       || sum(CAST(('0x' || substr(row_hash, 1, 16)) AS UBIGINT)::HUGEINT) || ':'
       || sum(CAST(('0x' || substr(row_hash, 17, 16)) AS UBIGINT)::HUGEINT))
   FROM ({rows}) GROUP BY shard_id"""


def _stats(
    con: duckdb.DuckDBPyConnection, rows_sql: str, params: dict[str, object], shard_count: int
) -> tuple[dict[int, str], dict[int, int]]:
    stats = con.execute(_SLICE_STATS.format(rows=rows_sql), params).fetchall()
    empty = con.execute("SELECT md5('0:NULL:NULL')").fetchone()[0]
    slice_rows = {k: 0 for k in range(shard_count)}
    slice_hashes = {k: empty for k in range(shard_count)}
    for shard_id, rows, digest in stats:
        slice_rows[int(shard_id)] = int(rows)
        slice_hashes[int(shard_id)] = digest
    return slice_hashes, slice_rows


def slice_stats(
    con: duckdb.DuckDBPyConnection, schema: SourceSchema, shard_count: int
) -> tuple[dict[int, str], dict[int, int]]:
    """Per-shard slice hash and row count of the `accepted` rows (after `read_source`)."""
    return _stats(con, _routed_sql(schema), {"n": shard_count}, shard_count)


def plan_slices(schema: SourceSchema, settings: EtlSettings) -> tuple[str, dict[int, str]]:
    """(file sha256, per-shard slice hashes) of the file as it is now; writes nothing."""
    path = Path(settings.data_dir) / schema.filename
    sha = file_sha256(path)
    with warehouse.scratch(settings.duckdb_limits) as con:
        install_rules(con)
        read_source(con, path, schema)
        hashes, _ = slice_stats(con, schema, settings.shard_count)
    return sha, hashes


def _write_slices(
    con: duckdb.DuckDBPyConnection, schema: SourceSchema, settings: EtlSettings, sha: str,
    hook: Hook,
) -> staging.StagedSource:
    n = settings.shard_count
    version_dir = Path(settings.staging_dir) / schema.name / f"{sha[:20]}-{_staging_key(settings)}"
    existing = version_dir.is_dir()
    # A full disk or a bad path while staging names the source's staging folder.
    with errors.naming(Path(settings.staging_dir) / schema.name):
        if existing and not settings.force:
            # Published earlier under this name. The name alone proves nothing (a version
            # staged by older code, or damaged on disk, keeps it): it is reused only if its
            # files hold exactly the rows just read, shard by shard.
            slice_hashes, slice_rows = _staged_stats(con, version_dir, n)
            if (slice_hashes, slice_rows) == slice_stats(con, schema, n):
                staged = staging.StagedSource(schema.name, sha, n, str(version_dir),
                                              slice_hashes, slice_rows)
                return staging.publish(settings.staging_dir, None, staged, hook)
        tmp = staging.new_temp_dir(settings.staging_dir, schema.name)
        try:
            return _stage_into(con, schema, settings, sha, tmp, version_dir, hook,
                               replace=existing)
        except BaseException:
            # Our own temp folder: nobody else will use it (a crash leaves it for _prune).
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _stage_into(
    con: duckdb.DuckDBPyConnection, schema: SourceSchema, settings: EtlSettings, sha: str,
    tmp: Path, version_dir: Path, hook: Hook, replace: bool,
) -> staging.StagedSource:
    """Write every slice into `tmp`, then publish it as `version_dir`."""
    n = settings.shard_count
    routed = _routed_sql(schema)
    # One pass routes and writes every shard's slice (shard_id=<k>/ folders); the stats are then
    # read back from the files' row_hash column, which is cheaper than routing every row again.
    con.execute(
        f"COPY ({routed}) TO $path (FORMAT parquet, PARTITION_BY (shard_id))",
        {"path": str(tmp), "n": n},
    )
    slice_hashes, slice_rows = _staged_stats(con, tmp, n)
    # Empty shards get an empty file with the schema so every shard can read its slice.
    for k in range(n):
        if slice_rows[k] == 0:
            folder = tmp / f"shard_id={k}"
            folder.mkdir()
            con.execute(
                f"COPY (SELECT * EXCLUDE (shard_id) FROM ({routed}) LIMIT 0) TO $path "
                "(FORMAT parquet)",
                {"path": str(folder / "empty.parquet"), "n": n},
            )
    staged = staging.StagedSource(schema.name, sha, n, str(version_dir), slice_hashes, slice_rows)
    return staging.publish(settings.staging_dir, tmp, staged, hook, replace=replace)


def _staged_stats(
    con: duckdb.DuckDBPyConnection, folder: Path, shard_count: int
) -> tuple[dict[int, str], dict[int, int]]:
    """Slice hashes and row counts of a staged version folder (shard_id=<k>/*.parquet)."""
    files = sorted(str(p) for p in folder.glob("shard_id=*/*.parquet"))
    if not files:
        return _stats(con, "SELECT NULL::INTEGER AS shard_id, NULL AS row_hash LIMIT 0", {},
                      shard_count)
    return _stats(
        con,
        "SELECT shard_id, row_hash FROM read_parquet($files, hive_partitioning = true, "
        "hive_types = {'shard_id': INTEGER})",
        {"files": duckdb_literals(files)},
        shard_count,
    )


def _staged_rows(con: duckdb.DuckDBPyConnection, staged: staging.StagedSource) -> dict[int, int]:
    """Rows per shard in a staged version's files; {} if any shard's slice is missing.

    One query over every slice (counts come from the Parquet footers), not one per shard: it
    runs for every source on every run's skip decision.
    """
    shard_ids = list(range(staged.shard_count))
    try:
        files = staging.all_slice_files({staged.source: staged}, shard_ids)
        counts = dict(con.execute(
            "SELECT shard_id, count(*) FROM read_parquet($files, hive_partitioning = true, "
            "hive_types = {'shard_id': INTEGER}) GROUP BY shard_id",
            {"files": duckdb_literals(files)}).fetchall())
    except (staging.StagingError, OSError, duckdb.Error):
        return {}
    return {k: int(counts.get(k, 0)) for k in shard_ids}


def read_shard_inputs(settings: EtlSettings) -> dict[int, tuple[str, dict[str, int]]]:
    """Per shard: (its input hash, rows per source) from the current staged pointers."""
    staged = staging.current_sources(settings)
    return {
        k: (staging.shard_input_hash(staged, k),
            {name: int(source.slice_rows[k]) for name, source in staged.items()})
        for k in settings.shard_ids
    }
