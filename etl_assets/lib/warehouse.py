"""The DuckDB warehouse: connections under a lock policy, the tables, and the short
transactional writes (a shard's rows, a source's rejected rows, the manifests).

DuckDB lets one process hold a database file read-write. Heavy work happens in scratch in-memory
connections; the warehouse file is attached only for the short write, which runs in one
transaction and is always followed by DETACH/close, even when it fails.

The warehouse may also be a DuckLake catalog (`ducklake.is_ducklake`): attached the same way,
written with the same statements, but shared by many writers without a lock; their commit
conflicts are retried (`ducklake.retry_conflicts`). Callers do not tell the two apart.
customer_profiles' shard tables are in `profile_tables`, its publication in `publish`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

import duckdb

from etl_assets.lib import ducklake, errors, interrupts, ownership
from etl_assets.lib.declaration import Declaration
from etl_assets.lib.faults import Hook, no_hook
from etl_assets.lib.limits import DuckDBLimits
from etl_assets.lib.rules import DECLARATION
from etl_assets.lib.schema import profile_columns

ALIAS = "wh"


T = TypeVar("T")


log = logging.getLogger(__name__)


_LOCK_HOLDER = re.compile(r"PID (\d+)")


class WarehouseLockedError(errors.PathError):
    """The warehouse file stayed locked by another process for longer than the lock timeout."""


def tables_ddl(decl: Declaration | None) -> tuple[str, ...]:
    """The statements that create a pipeline's tables (its profile columns, its key), or with
    None those every pipeline has; run on first use, idempotent. The keys are not what keeps
    one row per key (every write is DELETE by key + INSERT, in one transaction): DuckLake has
    no PRIMARY KEY, and its DDL (`ddl`) leaves them out."""
    shared = (
        f"""CREATE TABLE IF NOT EXISTS {ALIAS}.shard_manifest (
            shard_count INTEGER, shard_id INTEGER, source_data_hash VARCHAR, code_version VARCHAR,
            record_count BIGINT, run_id VARCHAR, PRIMARY KEY (shard_count, shard_id))""",
        # What each source's last staging produced, written with its rejected rows: the proof an
        # unchanged file need not be read again.
        f"""CREATE TABLE IF NOT EXISTS {ALIAS}.source_manifest (
            source VARCHAR PRIMARY KEY, file_sha256 VARCHAR, staging_key VARCHAR, rows_read BIGINT,
            rows_accepted BIGINT, rows_rejected BIGINT, reasons VARCHAR)""",
        # What the last customer_profiles rebuild was made from and the export it wrote: the proof
        # an unchanged re-run need not rebuild and export again.
        f"""CREATE TABLE IF NOT EXISTS {ALIAS}.profiles_manifest (
            shard_count INTEGER PRIMARY KEY, shards_hash VARCHAR, code_version VARCHAR,
            row_count BIGINT, export_path VARCHAR, export_sha256 VARCHAR)""",
        # Added after the table shipped: a warehouse made by older code gets the column (NULL,
        # which matches no snapshot, so its next run publishes one).
        f"ALTER TABLE {ALIAS}.profiles_manifest ADD COLUMN IF NOT EXISTS snapshot_sha256 VARCHAR",
        # Which version of each shard (JSON: shard_id -> shard_versions' text) the published table
        # and snapshot hold, so the next publish replaces only the shards that changed. NULL (older
        # code, another layout published since) means: rebuild everything.
        f"ALTER TABLE {ALIAS}.profiles_manifest ADD COLUMN IF NOT EXISTS shard_versions VARCHAR",
        # One row that every shard and rejected-rows write updates first (see `_claim`).
        f"CREATE TABLE IF NOT EXISTS {ALIAS}.write_guard AS SELECT CAST(0 AS BIGINT) AS writes",
        f"CREATE TABLE IF NOT EXISTS {ALIAS}.pipeline (name VARCHAR)",  # whose (ownership)
    )
    if decl is None:
        return shared
    profile = ", ".join(f"{name} {sql_type}" for name, sql_type in profile_columns(decl))
    return shared + (
        # shard_count is kept so rows from an earlier shard layout are never mixed with the current one.
        f"CREATE TABLE IF NOT EXISTS {ALIAS}.shard_profiles ({profile}, shard_count INTEGER)",
        f"""CREATE TABLE IF NOT EXISTS {ALIAS}.rejected_rows (
            source VARCHAR, line_number BIGINT, {decl.key} VARCHAR, reason VARCHAR, raw VARCHAR,
            file_sha256 VARCHAR)""")


def ddl(on_ducklake: bool, decl: Declaration | None = DECLARATION) -> tuple[str, ...]:
    """The statements that create the tables, for a DuckDB file or for DuckLake (no keys)."""
    statements = tables_ddl(decl)
    return tuple(re.sub(r",\s*PRIMARY KEY \([^)]*\)| PRIMARY KEY", "", stmt)
                 for stmt in statements) if on_ducklake else statements


class WarehouseUnreachableError(RuntimeError):
    """The DuckLake catalog could not be attached (message without any password)."""


def sql_string(path: str) -> str:
    """`path` as a SQL string literal, for ATTACH: DuckDB before 2.0 does not take a bound
    parameter there. The text is taken as is (a quote is doubled; no glob, no escapes)."""
    return "'" + path.replace("'", "''") + "'"


def _holder(message: str) -> str:
    if not (match := _LOCK_HOLDER.search(message)):
        return "another process"
    pid = match.group(1)
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        cmd = ""
    return f"process {pid}" + (f" ({cmd[:120]})" if cmd else "")


def _with_lock_retry(action: Callable[[], None], path: str, timeout_s: float) -> None:
    """Run `action` (which opens the file), waiting out lock conflicts with bounded backoff."""
    deadline = time.monotonic() + timeout_s
    wait = 0.05
    while True:
        try:
            action()
            return
        except duckdb.IOException as exc:
            message = str(exc)
            if "lock" not in message.lower():
                raise
            if time.monotonic() >= deadline:
                raise WarehouseLockedError(
                    path, f"still locked by {_holder(message)} after {timeout_s:.0f}s"
                ) from exc
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())) * random.uniform(0.5, 1.0))
            wait = min(wait * 2, 2.0)


def rollback_quietly(con: duckdb.DuckDBPyConnection) -> None:
    """ROLLBACK if a transaction is open; never raise: called while another error is on its
    way out (a COMMIT that failed, on a full disk, has already ended the transaction, and
    DuckDB's "no transaction is active" must not replace the error that says what happened)."""
    with suppress(duckdb.Error):
        con.execute("ROLLBACK")


def detach_quietly(con: duckdb.DuckDBPyConnection, alias: str = ALIAS) -> None:
    # The connection is closed next, which releases the file anyway.
    with contextlib.suppress(duckdb.Error):
        con.execute(f"DETACH {alias}")


def _attach_ducklake(con: duckdb.DuckDBPyConnection, path: str, data_path: str,
                     read_only: bool) -> None:
    """ATTACH a DuckLake catalog as `wh`; an unreachable one is one line without a password."""
    ducklake.load_extensions(con)
    failures = 0
    while True:
        try:
            con.execute(ducklake.attach_sql(path, ALIAS, data_path, read_only))
            return
        except duckdb.Error as exc:
            if read_only and ducklake.is_missing_catalog(exc):
                raise
            failures += 1
            # The first writers of a new lake (e.g. source steps on separate workers) race to
            # create its catalog; the losers attach again and find it made.
            if (not read_only and ducklake.is_creation_race(exc)
                    and failures < ducklake.RETRY.attempts):
                time.sleep(ducklake.RETRY.wait_s(failures))
                continue
            lines = str(exc).strip().splitlines()
            raise WarehouseUnreachableError(
                f"{ducklake.redact(path)}: cannot attach the DuckLake catalog: "
                f"{ducklake.redact(lines[0] if lines else type(exc).__name__)}") from None


def _attach(con: duckdb.DuckDBPyConnection, path: str, timeout_s: float, data_path: str) -> str:
    """ATTACH the warehouse read-write as `wh`, creating it if new; return the folder its data
    is written to (the one a full disk is named by)."""
    if ducklake.is_ducklake(path):
        with errors.naming(data_path):
            Path(data_path).mkdir(parents=True, exist_ok=True)
        _attach_ducklake(con, path, data_path, read_only=False)
        return data_path
    with errors.naming(Path(path).parent):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    _with_lock_retry(lambda: con.execute(f"ATTACH {sql_string(path)} AS {ALIAS}"), path,
                     timeout_s)
    return path


@contextmanager
def attached(con: duckdb.DuckDBPyConnection, path: str, timeout_s: float,
             data_path: str = "", decl: Declaration | None = DECLARATION) -> Iterator[str]:
    """Attach the warehouse to `con` as `wh` for a short write; always detach afterwards. A
    new one gets `decl`'s tables (None: every pipeline's); `decl`'s pipeline must own it, and
    its tables follow `decl` (`ownership`).

    `path` is a DuckDB file, or a DuckLake catalog with its table data under `data_path`.
    A full disk anywhere inside (ATTACH replaying the WAL, a COMMIT, the CHECKPOINT of DETACH)
    is reported as DiskFullError naming the warehouse file (DuckLake: its data folder). When
    the block fails, ROLLBACK and DETACH are attempted but cannot replace its error.
    """
    on_lake = ducklake.is_ducklake(path)
    with errors.disk_full_at(data_path if on_lake else path):
        _attach(con, path, timeout_s, data_path)
        try:
            statements = ddl(on_lake, decl)
            for statement in statements:
                # Two fresh writers creating the same table conflict on DuckLake; once the
                # tables exist these statements change nothing and never conflict.
                ducklake.retry_conflicts(lambda s=statement: con.execute(s), "creating tables")
            ownership.claim(con, ALIAS, decl, ducklake.redact(path), statements[-2:])
            yield ALIAS
        except BaseException:
            rollback_quietly(con)
            detach_quietly(con)
            raise
        rollback_quietly(con)  # no transaction open: the normal case
        con.execute(f"DETACH {ALIAS}")


@contextmanager
def scratch(limits: DuckDBLimits | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB connection for heavy work, closed whatever happens.

    With `limits`, DuckDB keeps to the memory limit by spilling to the temp directory.
    """
    config: dict[str, object] = {}
    spill_dir: str | None = None
    if limits is not None:
        if limits.memory_limit:
            config["memory_limit"] = limits.memory_limit
        if limits.threads:
            config["threads"] = limits.threads
        if limits.temp_directory:
            # A folder of its own: DuckDB names its spill files the same way in every process
            # and removes them on close, so connections must not share one.
            Path(limits.temp_directory).mkdir(parents=True, exist_ok=True)
            spill_dir = tempfile.mkdtemp(prefix="spill-", dir=limits.temp_directory)
            config["temp_directory"] = spill_dir
    try:
        con = duckdb.connect(":memory:", config=config)
        try:
            # No progress bar: on long queries DuckDB would draw it into the CLI's output.
            con.execute("SET enable_progress_bar = false")
            yield con
        except duckdb.OutOfMemoryException as exc:
            with contextlib.suppress(duckdb.Error):
                con.close()
            # Without its cause: the run's one line is the innermost error, and this is it.
            raise errors.MemoryLimitError(limits.memory_limit if limits else "",
                                          str(exc).strip().splitlines()[0]) from None
        except BaseException:
            # e.g. a still-attached file failing its checkpoint: the first error wins
            with contextlib.suppress(duckdb.Error):
                con.close()
            raise
        con.close()
    finally:
        if spill_dir is not None:
            shutil.rmtree(spill_dir, ignore_errors=True)


@contextmanager
def reader(
    path: str, timeout_s: float, limits: DuckDBLimits | None = None, data_path: str = "",
    decl: Declaration = DECLARATION,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A scratch connection with the warehouse attached (for reads and short writes)."""
    with scratch(limits) as con, attached(con, path, timeout_s, data_path, decl):
        yield con


@contextmanager
def read_only(
    path: str, timeout_s: float, limits: DuckDBLimits | None = None
) -> Iterator[duckdb.DuckDBPyConnection | None]:
    """A scratch connection with the warehouse attached READ_ONLY as `wh`, or None when there
    is no warehouse file yet.

    For decisions that only read (is a source or shard current?): a user's read-only
    connection to the warehouse (a notebook, the DuckDB CLI) does not block them, and they
    never create a file or a table. A DuckLake catalog never created is "no warehouse yet"
    too (the READ_ONLY attach creates nothing); its data folder is the one its catalog records.
    """
    on_lake = ducklake.is_ducklake(path)
    if not on_lake and not Path(path).is_file():
        yield None
        return
    with scratch(limits) as con:
        if on_lake:
            try:
                _attach_ducklake(con, path, "", read_only=True)
                missing = False
            except duckdb.Error as exc:
                if not ducklake.is_missing_catalog(exc):
                    raise
                missing = True
            if missing:
                yield None
                return
        else:
            _with_lock_retry(
                lambda: con.execute(f"ATTACH {sql_string(path)} AS {ALIAS} (READ_ONLY)"),
                path, timeout_s)
        try:
            yield con
        finally:
            con.execute(f"DETACH {ALIAS}")


def _has_table(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    return con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND table_name = ?",
        [ALIAS, table]).fetchone()[0] > 0


@contextmanager
def transaction(
    con: duckdb.DuckDBPyConnection, after_commit: Callable[[], None] | None = None
) -> Iterator[None]:
    """BEGIN, the body, COMMIT; on any error or interrupt before COMMIT, roll back and re-raise.

    `after_commit` runs right after COMMIT with signals deferred, for what must follow it
    without a gap (renaming the files the transaction recorded).
    """
    con.execute("BEGIN TRANSACTION")
    try:
        yield
        with interrupts.signals_deferred():
            con.execute("COMMIT")
            if after_commit is not None:
                after_commit()
    except BaseException:
        rollback_quietly(con)
        raise


def _claim(con: duckdb.DuckDBPyConnection) -> None:
    """First statement of a key-replacing write: update the one row of write_guard.

    DuckLake detects conflicts only between writes, and a DELETE that finds no row writes
    nothing: two first writes of one shard would both commit, and the shard would hold both
    runs' rows. Two transactions that updated the same row never both commit, so with this
    any two concurrent writers conflict (they would anyway once the table has rows). It also
    fixes the transaction's snapshot before anything is judged (see overwrite_shard). On a
    DuckDB file the lock already serializes writers, and this costs one tiny update.
    """
    con.execute(f"UPDATE {ALIAS}.write_guard SET writes = writes + 1")


def overwrite_shard(
    con: duckdb.DuckDBPyConnection,
    rows_table: str,
    *,
    shard_count: int,
    shard_id: int,
    manifest: dict[str, object],
    hook: Hook = no_hook,
    still_current: Callable[[], None] | None = None,
) -> int:
    """Replace one shard's rows and manifest entry in ONE transaction; return the rows written.

    `con` must have the warehouse attached (see `attached`). `rows_table` holds the new profile
    rows. `hook` is called at the fault points inside the transaction; if anything raises
    (or the process dies) before COMMIT, the old rows stay.

    `still_current` (raising if the rows are outdated) is asked inside the transaction, after
    `_claim`. On a DuckDB file the writer's lock makes that enough. On DuckLake a write of
    this shard committed by anyone after the claim makes our COMMIT conflict, and the retry
    asks `still_current` again, so rows judged current are never committed over a newer
    write (a compare-and-set).
    """
    return ducklake.retry_conflicts(
        lambda: _overwrite_shard_once(con, rows_table, shard_count, shard_id, manifest, hook,
                                      still_current),
        f"shard {shard_id}")


def _overwrite_shard_once(
    con: duckdb.DuckDBPyConnection, rows_table: str, shard_count: int, shard_id: int,
    manifest: dict[str, object], hook: Hook, still_current: Callable[[], None] | None,
) -> int:
    """One attempt of `overwrite_shard`: BEGIN, the body, COMMIT."""
    with transaction(con):
        _claim(con)
        if still_current is not None:
            still_current()
        con.execute(
            f"DELETE FROM {ALIAS}.shard_profiles WHERE shard_count = ? AND shard_id = ?",
            [shard_count, shard_id],
        )
        hook("shard_after_delete")
        con.execute(
            # Sorted by the key, the first profile column (the export starts with it).
            f"INSERT INTO {ALIAS}.shard_profiles SELECT *, CAST(? AS INTEGER) FROM {rows_table} "
            "ORDER BY 1",
            [shard_count],
        )
        written = con.execute(
            f"SELECT count(*) FROM {ALIAS}.shard_profiles WHERE shard_count = ? AND shard_id = ?",
            [shard_count, shard_id],
        ).fetchone()[0]
        con.execute(f"DELETE FROM {ALIAS}.shard_manifest WHERE shard_count = ? AND shard_id = ?",
                    [shard_count, shard_id])
        con.execute(
            f"INSERT INTO {ALIAS}.shard_manifest VALUES (?, ?, ?, ?, ?, ?)",
            [
                shard_count,
                shard_id,
                manifest["source_data_hash"],
                manifest["code_version"],
                written,
                manifest["run_id"],
            ],
        )
        hook("shard_before_commit")
    return int(written)


def read_source_manifest(con: duckdb.DuckDBPyConnection, source: str) -> dict | None:
    """The source's manifest row (see replace_rejected), or None."""
    if not _has_table(con, "source_manifest"):
        return None
    cur = con.execute(f"SELECT * FROM {ALIAS}.source_manifest WHERE source = ?", [source])
    row = cur.fetchone()
    return dict(zip([d[0] for d in cur.description], row, strict=True)) if row else None


def read_manifest(con: duckdb.DuckDBPyConnection, shard_count: int) -> dict[int, dict]:
    """shard_id -> {source_data_hash, code_version, record_count, run_id} for this layout."""
    if not _has_table(con, "shard_manifest"):
        return {}
    return manifest_in(con, ALIAS, shard_count)


def manifest_in(con: duckdb.DuckDBPyConnection, database: str,
                 shard_count: int) -> dict[int, dict]:
    cur = con.execute(
        f"SELECT shard_id, source_data_hash, code_version, record_count, run_id "
        f"FROM {database}.shard_manifest WHERE shard_count = ?",
        [shard_count],
    )
    names = [d[0] for d in cur.description]
    return {int(row[0]): dict(zip(names[1:], row[1:], strict=True)) for row in cur.fetchall()}


def read_profiles_manifest(con: duckdb.DuckDBPyConnection, shard_count: int) -> dict | None:
    """The last customer_profiles build for this layout (see publish_customer_profiles), or None."""
    if not _has_table(con, "profiles_manifest"):
        return None
    cur = con.execute(f"SELECT * FROM {ALIAS}.profiles_manifest WHERE shard_count = ?",
                      [shard_count])
    row = cur.fetchone()
    return dict(zip([d[0] for d in cur.description], row, strict=True)) if row else None


def replace_rejected(
    con: duckdb.DuckDBPyConnection,
    source: str,
    rejected_table: str,
    file_sha256: str,
    manifest: dict[str, object],
    hook: Hook = no_hook,
) -> None:
    """Replace a source's quarantined rows and its manifest row in one transaction.

    `manifest` holds staging_key, rows_read, rows_accepted, rows_rejected and reasons (JSON).
    """
    ducklake.retry_conflicts(
        lambda: _replace_rejected_once(con, source, rejected_table, file_sha256, manifest, hook),
        f"rejected rows of {source}")


def _replace_rejected_once(
    con: duckdb.DuckDBPyConnection, source: str, rejected_table: str, file_sha256: str,
    manifest: dict[str, object], hook: Hook,
) -> None:
    """One attempt of `replace_rejected`: BEGIN, the body, COMMIT."""
    with transaction(con):
        _claim(con)
        con.execute(f"DELETE FROM {ALIAS}.rejected_rows WHERE source = ?", [source])
        con.execute(
            # `rejected_table` holds line_number, the key, reason and raw, in that order.
            f"INSERT INTO {ALIAS}.rejected_rows SELECT ?, r.*, ? "
            f"FROM {rejected_table} r ORDER BY line_number",
            [source, file_sha256],
        )
        con.execute(f"DELETE FROM {ALIAS}.source_manifest WHERE source = ?", [source])
        con.execute(
            f"INSERT INTO {ALIAS}.source_manifest VALUES (?, ?, ?, ?, ?, ?, ?)",
            [source, file_sha256, manifest["staging_key"], manifest["rows_read"],
             manifest["rows_accepted"], manifest["rows_rejected"], manifest["reasons"]],
        )
        hook("source_rejected_write")
