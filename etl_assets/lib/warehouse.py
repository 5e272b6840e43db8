"""The DuckDB warehouse: connections under a lock policy, and the transactional writes.

DuckDB lets one process hold a database file read-write. Heavy work happens in scratch in-memory
connections; the warehouse file is attached only for the short write, which runs in one
transaction and is always followed by DETACH/close, even when it fails.

The warehouse may also be a DuckLake catalog (`ducklake.is_ducklake`): attached the same way,
written with the same statements, but shared by many writers without a lock; their commit
conflicts are retried (`ducklake.retry_conflicts`). Callers do not tell the two apart.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import queue
import random
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import duckdb

from etl_assets.lib import ducklake, errors, export_parts, uncached
from etl_assets.lib.events import report_progress
from etl_assets.lib.faults import Hook, injected, no_hook
from etl_assets.lib.limits import DuckDBLimits, cores
from etl_assets.lib.schema import profile_columns
from etl_assets.lib.validation import file_sha256

ALIAS = "wh"
T = TypeVar("T")
log = logging.getLogger(__name__)
_LOCK_HOLDER = re.compile(r"PID (\d+)")


class WarehouseLockedError(errors.PathError):
    """The warehouse file stayed locked by another process for longer than the lock timeout."""


def _profile_ddl(extra: str = "") -> str:
    cols = ", ".join(f"{name} {sql_type}" for name, sql_type in profile_columns())
    return f"({cols}{extra})"


# Tables are created on first use; the statements are idempotent. The keys are not what keeps
# one row per key (every write is DELETE by key + INSERT, in one transaction): DuckLake has no
# PRIMARY KEY, and its DDL (`ddl`) leaves them out.
DDL: tuple[str, ...] = (
    # shard_count is kept so rows from an earlier shard layout are never mixed with the current one.
    f"CREATE TABLE IF NOT EXISTS {ALIAS}.shard_profiles {_profile_ddl(', shard_count INTEGER')}",
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
    f"""CREATE TABLE IF NOT EXISTS {ALIAS}.rejected_rows (
        source VARCHAR, line_number BIGINT, customer_id VARCHAR, reason VARCHAR, raw VARCHAR,
        file_sha256 VARCHAR)""",
    # One row that every shard and rejected-rows write updates first (see `_claim`).
    f"CREATE TABLE IF NOT EXISTS {ALIAS}.write_guard AS SELECT CAST(0 AS BIGINT) AS writes",
)


def ddl(on_ducklake: bool) -> tuple[str, ...]:
    """The statements that create the tables, for a DuckDB file or for DuckLake (no keys)."""
    if not on_ducklake:
        return DDL
    return tuple(re.sub(r",\s*PRIMARY KEY \([^)]*\)| PRIMARY KEY", "", stmt) for stmt in DDL)


class WarehouseUnreachableError(RuntimeError):
    """The DuckLake catalog could not be attached (message without any password)."""


def _sql_string(path: str) -> str:
    """`path` as a SQL string literal, for ATTACH: DuckDB before 2.0 does not take a bound
    parameter there. The text is taken as is (a quote is doubled; no glob, no escapes)."""
    return "'" + path.replace("'", "''") + "'"


def _holder(message: str) -> str:
    match = _LOCK_HOLDER.search(message)
    if not match:
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
    """ROLLBACK if a transaction is open; never raise.

    Called while another error is on its way out: a COMMIT that failed (a full disk) has already
    ended the transaction, and DuckDB's "cannot rollback - no transaction is active" must not
    replace the error that says what happened.
    """
    with suppress(duckdb.Error):
        con.execute("ROLLBACK")


def _detach_quietly(con: duckdb.DuckDBPyConnection, alias: str = ALIAS) -> None:
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
    _with_lock_retry(lambda: con.execute(f"ATTACH {_sql_string(path)} AS {ALIAS}"), path,
                     timeout_s)
    return path


@contextmanager
def attached(con: duckdb.DuckDBPyConnection, path: str, timeout_s: float,
             data_path: str = "") -> Iterator[str]:
    """Attach the warehouse to `con` as `wh` for a short write; always detach afterwards.

    `path` is a DuckDB file, or a DuckLake catalog with its table data under `data_path`.
    A full disk anywhere inside (ATTACH replaying the WAL, a COMMIT, the CHECKPOINT of DETACH)
    is reported as DiskFullError naming the warehouse file (DuckLake: its data folder). When
    the block fails, ROLLBACK and DETACH are attempted but cannot replace its error.
    """
    on_lake = ducklake.is_ducklake(path)
    with errors.disk_full_at(data_path if on_lake else path):
        _attach(con, path, timeout_s, data_path)
        try:
            for statement in ddl(on_lake):
                # Two fresh writers creating the same table conflict on DuckLake; once the
                # tables exist these statements change nothing and never conflict.
                ducklake.retry_conflicts(lambda s=statement: con.execute(s), "creating tables")
            yield ALIAS
        except BaseException:
            rollback_quietly(con)
            _detach_quietly(con)
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
    path: str, timeout_s: float, limits: DuckDBLimits | None = None, data_path: str = ""
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A scratch connection with the warehouse attached (for reads and short writes)."""
    with scratch(limits) as con, attached(con, path, timeout_s, data_path):
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
                lambda: con.execute(f"ATTACH {_sql_string(path)} AS {ALIAS} (READ_ONLY)"),
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
        with _signals_deferred():
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
            f"INSERT INTO {ALIAS}.shard_profiles SELECT *, CAST(? AS INTEGER) FROM {rows_table} "
            "ORDER BY customer_id",
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
    return _manifest_in(con, ALIAS, shard_count)


def _manifest_in(con: duckdb.DuckDBPyConnection, database: str,
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
            f"INSERT INTO {ALIAS}.rejected_rows SELECT ?, line_number, customer_id, reason, raw, ? "
            f"FROM {rejected_table} ORDER BY line_number",
            [source, file_sha256],
        )
        con.execute(f"DELETE FROM {ALIAS}.source_manifest WHERE source = ?", [source])
        con.execute(
            f"INSERT INTO {ALIAS}.source_manifest VALUES (?, ?, ?, ?, ?, ?, ?)",
            [source, file_sha256, manifest["staging_key"], manifest["rows_read"],
             manifest["rows_accepted"], manifest["rows_rejected"], manifest["reasons"]],
        )
        hook("source_rejected_write")


def _one_per_key(con: duckdb.DuckDBPyConnection, shard_count: int,
                 shards: list[int] | None = None) -> str:
    """The QUALIFY that keeps one row per idempotency key in the rows of `shards` (default:
    all), or "" when the probe (in the caller's transaction) finds none repeated there: keys
    are normally unique already, and the window costs about 0.4 s per 1M rows. A key starts
    with its customer_id, which routes to one shard, so a repeated key is always within one
    shard, and only the shards about to be written need probing (10M, one shard changed:
    1.5 s for the whole table)."""
    repeated = con.execute(
        f"""SELECT count(*) > count(DISTINCT idempotency_key) FROM {ALIAS}.shard_profiles
            WHERE shard_count = $n AND ($all OR list_contains($shards, shard_id))""",
        {"n": shard_count, "all": shards is None, "shards": shards or []},
    ).fetchone()[0]
    return ("QUALIFY row_number() OVER (PARTITION BY idempotency_key ORDER BY shard_id) = 1"
            if repeated else "")


def _shard_rows_sql(one_per_key: str) -> str:
    """One shard's profile rows, sorted by customer_id (parameters: shard_count, shard_id)."""
    cols = ", ".join(name for name, _ in profile_columns())
    return (f"SELECT {cols} FROM {ALIAS}.shard_profiles WHERE shard_count = ? AND shard_id = ? "
            f"{one_per_key} ORDER BY customer_id")


PROFILES_SHARD_TABLE = "customer_profiles_shard_{}"  # one shard's rows of customer_profiles


def _replace_shards(
    con: duckdb.DuckDBPyConnection, shard_count: int, db: str, one_per_key: str,
    shards: list[int] | None = None, hook: Hook = no_hook, copy_from: str | None = None,
) -> None:
    """Inside the caller's transaction: make `db`.customer_profiles hold the current shard
    layout, one row per idempotency key. `shards` None: every shard; otherwise only those (the
    others already hold their current rows: the cost follows what changed). With `copy_from`
    (the snapshot being published, attached), each shard's table is copied from its table
    there, already sorted, rather than sorted again from shard_profiles.

    customer_profiles is a view, `UNION ALL` over one table per shard (each sorted by
    customer_id), so replacing a shard writes that shard's table alone and drops the old one.
    One table with a DELETE and INSERT per shard was measured first: a shard's rows are spread
    over every row group, and the checkpoint's vacuum then rewrote most of the table (1.4 s of
    CPU per 1M rows for a one-shard change). The view names its tables without a catalog, so it
    resolves in whichever database holds it: the warehouse or the snapshot, under any alias.
    At the `merge_duplicate` fault (the warehouse's table only) shard 0's first row is written
    twice, for the test that the audit stops it.
    """
    _write_shard_tables(con, shard_count, db, one_per_key,
                        range(shard_count) if shards is None else shards, copy_from)
    tables = {row[0]: row[1] for row in con.execute(
        """SELECT table_name, 'TABLE' FROM duckdb_tables() WHERE database_name = ?
           UNION ALL SELECT view_name, 'VIEW' FROM duckdb_views() WHERE database_name = ?""",
        [db, db]).fetchall()}
    if tables.get("customer_profiles") == "TABLE":  # written by older code
        con.execute(f"DROP TABLE {db}.customer_profiles")
    current = [PROFILES_SHARD_TABLE.format(k) for k in range(shard_count)]
    for name in tables:
        # Another layout's shard tables: no longer part of customer_profiles.
        if name.startswith(PROFILES_SHARD_TABLE.format("")) and name not in current:
            con.execute(f'DROP TABLE {db}."{name}"')
    con.execute(f"CREATE OR REPLACE VIEW {db}.customer_profiles AS "
                + " UNION ALL ".join(f"SELECT * FROM {name}" for name in current))
    if injected(hook, "merge_duplicate"):
        first = f"{db}.{current[0]}"
        con.execute(f"INSERT INTO {first} SELECT * FROM {first} ORDER BY customer_id LIMIT 1")


def _write_shard_tables(
    con: duckdb.DuckDBPyConnection, shard_count: int, db: str, one_per_key: str,
    shards: Iterable[int], copy_from: str | None = None, parallel: bool = False,
) -> None:
    """(Re)write `db`'s table of each of `shards` (see _replace_shards). `parallel`: each table
    in its own transaction, on its own cursor, up to one per core (only where no transaction
    must hold them all: the snapshot's temp file)."""
    def task(shard_id: int) -> Callable[[duckdb.DuckDBPyConnection], None]:
        table = PROFILES_SHARD_TABLE.format(shard_id)

        def write(cur: duckdb.DuckDBPyConnection) -> None:
            if copy_from:
                cur.execute(f"CREATE OR REPLACE TABLE {db}.{table} AS "
                            f"SELECT * FROM {copy_from}.{table}")
            else:
                cur.execute(f"CREATE OR REPLACE TABLE {db}.{table} AS "
                            f"{_shard_rows_sql(one_per_key)}", [shard_count, shard_id])
        return write

    tasks = [task(k) for k in shards]
    if parallel:
        in_parallel(con, tasks)
    else:
        for write in tasks:
            write(con)


def in_parallel(con: duckdb.DuckDBPyConnection,
                tasks: list[Callable[[duckdb.DuckDBPyConnection], T]]) -> list[T]:
    """Each task run on a cursor of `con`, up to one task per core at a time; their results in
    task order.

    A cursor shares `con`'s database instance and attached files but has its own transaction,
    and DuckDB releases the GIL while a query runs: per-shard statements smaller than two row
    groups use one DuckDB thread each (see _per_shard_threads), so running them side by side
    is what keeps every core busy. On any error or interrupt the other cursors' queries are
    interrupted and waited for before it is raised.
    """
    workers = min(cores(), len(tasks))
    if workers <= 1:
        return [task(con) for task in tasks]
    cursors: queue.SimpleQueue = queue.SimpleQueue()
    opened = [con.cursor() for _ in range(workers)]
    for cur in opened:
        cursors.put(cur)

    def run(task: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        cur = cursors.get()
        try:
            return task(cur)
        finally:
            cursors.put(cur)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="etl-shard-table")
    futures = [pool.submit(run, task) for task in tasks]
    try:
        return [future.result() for future in futures]
    except BaseException:
        for future in futures:
            future.cancel()
        for cur in opened:
            with suppress(duckdb.Error):
                cur.interrupt()
        raise
    finally:
        pool.shutdown(wait=True)
        for cur in opened:
            with suppress(duckdb.Error):
                cur.close()


def _rebuild_table(con: duckdb.DuckDBPyConnection, shard_count: int) -> int:
    """Inside the caller's transaction: rebuild the warehouse's customer_profiles whole from
    the current shard layout; return its row count."""
    _replace_shards(con, shard_count, ALIAS, _one_per_key(con, shard_count))
    return int(con.execute(f"SELECT count(*) FROM {ALIAS}.customer_profiles").fetchone()[0])


def shard_versions(con: duckdb.DuckDBPyConnection, shard_count: int) -> dict[int, str]:
    """shard_id -> the version of its rows in shard_profiles: its manifest entry (written in
    the same transaction as the rows), run_id included so a forced rebuild counts as a change."""
    return {k: f"{e['source_data_hash']}|{e['code_version']}|{e['record_count']}|{e['run_id']}"
            for k, e in read_manifest(con, shard_count).items()}


# DuckDB's row group: the unit it parallelizes a scan or a write over.
ROW_GROUP_ROWS = 122_880


@contextmanager
def _per_shard_threads(con: duckdb.DuckDBPyConnection, rows_per_shard: float) -> Iterator[None]:
    """One DuckDB thread for the per-shard statements when a shard is smaller than two row
    groups, then the connection's own setting again.

    DuckDB splits work by row group, so a second thread has nothing of its own to do on a
    shard table of one row group and only adds overhead: measured on 1M customers in 10
    shards, the publish took 13.1-14.4 s of CPU with 2 threads and 8.0 s with 1 (the whole-table
    rebuild it replaced: 9.0 s). Larger shards (10M customers) keep every thread.
    """
    if rows_per_shard >= 2 * ROW_GROUP_ROWS:
        yield
        return
    threads = int(con.execute("SELECT current_setting('threads')").fetchone()[0])
    con.execute("SET threads = 1")
    try:
        yield
    finally:
        con.execute(f"SET threads = {threads}")  # an int read back from DuckDB


def _changed_shards(entry: dict | None, code_version: object,
                    versions: dict[int, str]) -> list[int] | None:
    """The shards whose rows differ from those the published table holds, or None when it
    must be rebuilt whole (no publish for this layout and code, or one by older code)."""
    if entry is None or entry.get("code_version") != code_version \
            or not entry.get("shard_versions"):
        return None
    published = {int(k): v for k, v in json.loads(entry["shard_versions"]).items()}
    if set(published) != set(versions):
        return None
    return [k for k in sorted(versions) if published[k] != versions[k]]


def rebuild_customer_profiles(con: duckdb.DuckDBPyConnection, shard_count: int) -> int:
    """Rebuild the table alone (no export), for tests and tools; `publish_customer_profiles`
    is what the pipeline uses. The profiles manifest is cleared: no export matches it now."""
    with transaction(con):
        count = _rebuild_table(con, shard_count)
        con.execute(f"DELETE FROM {ALIAS}.profiles_manifest")
    return count


def check_export_target(export_path: str) -> None:
    """Raise PathError if the export (or the snapshot) cannot be written at `export_path`,
    before anything changes.

    A directory there would only fail at the final rename, after the table was committed.
    """
    target = Path(export_path)
    if target.is_dir():
        raise errors.PathError(target, "is a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise errors.PathError(target, "parent is not a directory") from None
    except OSError as exc:
        if errors.is_disk_full(exc):
            raise errors.DiskFullError(target) from exc
        raise errors.PathError(target, errors.os_problem(exc)) from exc


def _temp_path(target: Path) -> Path:
    """This process's temp file for `target`: `.<name>.<pid>.tmp` in the same folder, so the
    final rename stays on one filesystem (atomic)."""
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def _stale_temps(target: Path) -> Iterator[Path]:
    """Temp files of `target` (`.<name>.<pid>.tmp`, and DuckDB's `.wal` beside a snapshot's)
    left by processes that no longer exist."""
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp*"):
        pid, _, suffix = tmp.name[len(target.name) + 2:].partition(".")
        if suffix in ("tmp", "tmp.wal") and pid.isdigit() and int(pid) != os.getpid() \
                and not Path(f"/proc/{pid}").exists():
            yield tmp


def wal_files(database: Path) -> list[Path]:
    """DuckDB's write-ahead log beside a database file (`<name>.wal`): changes written to it
    and not yet checkpointed, which whoever opens the file next replays onto it."""
    return sorted(database.parent.glob(f"{glob.escape(database.name)}.wal*"))


def _remove_temp(tmp: Path) -> None:
    """Remove a temp file and the WAL DuckDB may have left beside it."""
    tmp.unlink(missing_ok=True)
    tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)


SNAPSHOT = "snap"  # the snapshot temp file's alias while it is attached

# The tables copied into the snapshot besides customer_profiles, each in a fixed order so that
# the same warehouse always gives the same rows in the same order.
SNAPSHOT_TABLES: dict[str, str] = {
    "rejected_rows": "source, line_number",
    "source_manifest": "source",
    "shard_manifest": "shard_count, shard_id",
}


def _write_snapshot(
    con: duckdb.DuckDBPyConnection, tmp: Path, target: Path, shard_count: int, one_per_key: str,
    changed: list[int] | None, hook: Hook,
) -> str:
    """Build the snapshot in `tmp`, durably: the customer_profiles this publish will commit
    and copies of SNAPSHOT_TABLES; return the file's sha256.

    With `changed` (the published snapshot is intact and holds the published shard versions),
    the published file is copied and only the changed shards' rows are replaced in the copy;
    otherwise it is built whole. It runs before the warehouse transaction because one DuckDB
    transaction may write only one database; the warehouse stays attached (and locked by this
    process) throughout, so nothing changes in between. Errors name `target`, the path a user
    frees space for.
    """
    with errors.naming(target):
        if changed is None:
            # Created and removed first, so a missing permission is an OSError naming the
            # problem rather than DuckDB's wording of it (DuckDB will not take an empty file as
            # a new one).
            with open(tmp, "xb"):
                pass
            tmp.unlink()
        else:
            shutil.copyfile(target, tmp)
        con.execute(f"ATTACH {_sql_string(str(tmp))} AS {SNAPSHOT}")
        try:
            # A temp file nobody reads until it is renamed into place: its shard tables need
            # no common transaction, so they are written side by side.
            _write_shard_tables(con, shard_count, SNAPSHOT, one_per_key,
                                range(shard_count) if changed is None else changed,
                                parallel=True)
            with transaction(con):
                # No fault hook: the export's parts are read from here and kept.
                _replace_shards(con, shard_count, SNAPSHOT, one_per_key, [])
                for table, order in SNAPSHOT_TABLES.items():
                    con.execute(f"CREATE OR REPLACE TABLE {SNAPSHOT}.{table} AS "
                                f"SELECT * FROM {ALIAS}.{table} ORDER BY {order}")
                hook("snapshot_write")
            # DETACH checkpoints: the file is complete (no WAL beside it) once it returns.
            con.execute(f"DETACH {SNAPSHOT}")
        except BaseException:
            _detach_quietly(con, SNAPSHOT)  # the transaction has already rolled back
            raise
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    return file_sha256(tmp)


def _write_parts(con: duckdb.DuckDBPyConnection, shard_count: int, versions: dict[int, str],
                 parts_dir: Path, kept: dict[int, str]) -> list[Path]:
    """Each shard's sorted CSV part, written only where its version has none yet (see
    export_parts); older parts of this layout (but the `kept` versions': shard -> version)
    and dead processes' temp files are removed.

    Read from the snapshot being published (attached as `snap`): its shard tables hold these
    versions, already sorted by customer_id, and a scan keeps that order
    (preserve_insertion_order, DuckDB's default, set here), so no part sorts again.
    """
    con.execute("SET preserve_insertion_order = true")
    with errors.naming(parts_dir):
        parts_dir.mkdir(parents=True, exist_ok=True)

        def part(shard_id: int, version: str) -> Callable[[duckdb.DuckDBPyConnection], Path]:
            found = _parts_of(parts_dir, shard_count, shard_id, version)
            return lambda cur: found[0] if found else _write_part(
                cur, shard_count, shard_id, version, parts_dir)

        # Each part read and written on its own cursor, side by side (see in_parallel).
        parts = in_parallel(con, [part(k, v) for k, v in sorted(versions.items())])
        keep = {p.name for p in parts} | {p.name for k, v in kept.items()
                                          for p in _parts_of(parts_dir, shard_count, k, v)}
        for old in parts_dir.glob(f"{shard_count}-*.csv"):
            if old.name not in keep:
                old.unlink(missing_ok=True)
        for stale in _stale_temps_in(parts_dir):
            stale.unlink(missing_ok=True)
    return parts


def _write_part(cur: duckdb.DuckDBPyConnection, shard_count: int, shard_id: int, version: str,
                parts_dir: Path) -> Path:
    """Write one shard version's part from its table in the snapshot being published."""
    text = [name for name, sql_type in profile_columns() if sql_type == "VARCHAR"]
    return export_parts.write_part(
        cur, f"SELECT * FROM {SNAPSHOT}.{PROFILES_SHARD_TABLE.format(shard_id)}", text,
        parts_dir, export_parts.part_prefix(shard_count, shard_id, version))


def _parts_of(parts_dir: Path, shard_count: int, shard_id: int, version: str) -> list[Path]:
    """The part files written for one shard version (one, or none yet). A part whose name
    records no sha256 (written by older code) is not one: nothing could prove it."""
    prefix = export_parts.part_prefix(shard_count, shard_id, version)
    return [p for p in sorted(parts_dir.glob(f"{glob.escape(prefix)}*.csv"))
            if export_parts.recorded_sha256(p)]


def _kept_parts(entry: dict | None, changed: list[int] | None, shard_count: int,
                export_path: str) -> dict[int, str]:
    """Changed shard -> the version of it the published export holds, for the shards whose
    published part is kept so that the export can be patched rather than merged whole
    (export_parts.patch): only when at most a quarter of the shards changed (beyond that, most
    of the export changes) and the export is where it was published."""
    if not changed or entry is None or not entry.get("export_sha256") \
            or entry.get("export_path") != export_path \
            or len(changed) > max(1, shard_count // 4):
        return {}
    published = json.loads(entry["shard_versions"])
    return {k: published[str(k)] for k in changed}


@dataclass(frozen=True)
class _PatchBase:
    """What the export can be patched from: the published export, its recorded sha256, and
    each changed shard's (published part, new part)."""

    export: Path
    sha256: str
    replaced: list[tuple[Path, Path]]


def _patch_base(target: Path, entry: dict | None, kept: dict[int, str], parts: list[Path],
                parts_dir: Path, shard_count: int) -> _PatchBase | None:
    """The base to patch the export from, or None when it must be merged whole: no part kept,
    no export where it was published, or a part that is not plain (patching edits lines)."""
    if entry is None or not kept or not target.is_file() \
            or not all(map(export_parts.is_plain, parts)):
        return None
    replaced = []
    for shard_id, version in sorted(kept.items()):
        found = _parts_of(parts_dir, shard_count, shard_id, version)
        if not found or not export_parts.is_plain(found[0]):
            return None
        replaced.append((found[0], parts[shard_id]))
    return _PatchBase(target, entry["export_sha256"], replaced)


def _stale_temps_in(folder: Path) -> Iterator[Path]:
    """`.<name>.<pid>.tmp` files in `folder` left by processes that no longer exist."""
    for tmp in folder.glob(".*.tmp"):
        pid = tmp.name[:-len(".tmp")].rpartition(".")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            yield tmp


def _export_header(con: duckdb.DuckDBPyConnection, tmp: Path, target: Path) -> bytes:
    """The export's header line, as DuckDB writes it for customer_profiles' columns (read from
    the snapshot being published: the same view as the warehouse's). Creates `tmp` empty first,
    so that a missing permission is an OSError naming the problem rather than DuckDB's wording
    of it. Errors name `target`: the path a user gave and has to fix or free space for."""
    cols = ", ".join(name for name, _ in profile_columns())
    with errors.naming(target):
        with open(tmp, "xb"):
            pass
        return export_parts.header(con, f"SELECT {cols} FROM {SNAPSHOT}.customer_profiles LIMIT 0",
                                   tmp.with_name(tmp.name + ".head"))


class _HashingWriter:
    """A binary file that also hashes what is written to it (so the export is not read back)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.digest = out, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.out.write(data)

    def writelines(self, lines: Iterable[bytes]) -> None:
        data = b"".join(lines)
        self.digest.update(data)
        self.out.write(data)


def _write_export(tmp: Path, target: Path, head: bytes, parts: list[Path], hook: Hook,
                  stop: threading.Event | None = None, base: _PatchBase | None = None,
                  rewrite: Callable[[int], Path] | None = None) -> tuple[str, int, str]:
    """Write the export to `tmp` (made by _export_header), durably: `head`, then the shards'
    sorted parts merged on customer_id (export_parts), or the same bytes patched from `base`
    when it can be; return its sha256, how many records it holds (both taken from the bytes as
    they are written) and how it was written. Stops (MergeStopped) once `stop` is set. Errors
    name `target`.

    A part found damaged as it is merged (not the bytes its name records, cut short, out of
    order) is written again by `rewrite(shard_id)` from the table, with one warning line, and
    the merge starts over; without `rewrite` the merge's PartDamagedError is raised."""
    parts = list(parts)
    with errors.naming(target):
        written = None
        how = f"merged from {len(parts)} parts"
        if base is not None:
            try:
                written = _write_durably(tmp, lambda out: export_parts.patch(
                    head, base.export, base.sha256, base.replaced, out, stop))
                how = (f"patched: the published export with the changed lines of "
                       f"{len(base.replaced)} shard(s)")
            except export_parts.NotPatchable as exc:
                how += f" (not patched: {exc})"

        def merged(out: BinaryIO) -> tuple[int, str]:
            writer = _HashingWriter(out)
            return export_parts.merge(head, parts, writer, stop), writer.digest.hexdigest()

        rounds = 0
        while written is None:
            try:
                written = _write_durably(tmp, merged)
            except export_parts.PartDamagedError as exc:
                # Each round writes at least one part again, so there is at most one per part.
                rounds += 1
                if rewrite is None or rounds > len(parts):
                    raise
                log.warning(f"{exc}; written again from customer_profiles")
                for path in exc.paths:
                    shard_id = parts.index(path)
                    parts[shard_id] = rewrite(shard_id)
        hook("export_write")
    return (*written, how)


def _write_durably(tmp: Path, fill: Callable[[BinaryIO], tuple[int, str]]) -> tuple[str, int]:
    """`fill(out)` writes `tmp` over, returning its record count and the sha256 of what it
    wrote (taken as it is written); then it is fsynced (on disk before the manifest that names
    its hash commits; a full disk can also show up only here, when delayed writes are flushed).
    Its sha256 and the count."""
    # Written around the page cache (uncached): nothing in this run reads the export again.
    with uncached.UncachedWriter(tmp) as out:
        records, sha = fill(out)  # type: ignore[arg-type]
        out.finish()
    return sha, records


class _Background:
    """A function run in a thread beside the caller's work; `result()` waits for it and returns
    its value or raises its exception. `stop` is set when the caller gives up on it."""

    def __init__(self, work: Callable[[threading.Event], tuple[str, int, str]]) -> None:
        self.stop = threading.Event()
        self._value: tuple[str, int, str] | None = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = work(self.stop)
            except BaseException as exc:  # handed to the caller in result()
                self._error = exc

        self._thread = threading.Thread(target=run, name="etl-export-merge", daemon=True)
        self._thread.start()

    def result(self) -> tuple[str, int, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def cancel(self) -> None:
        """Ask it to stop and wait until it has (it writes only its own temp file)."""
        self.stop.set()
        self._thread.join()


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then deliver them.

    Between COMMIT and the export's rename the table and the export disagree; an interrupt
    there would leave them so until the next run. (Signals reach only the main thread's
    handlers; elsewhere this does nothing.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in received[:1]:
            signal.raise_signal(signum)


def publish_customer_profiles(
    con: duckdb.DuckDBPyConnection,
    shard_count: int,
    export_path: str,
    snapshot_path: str,
    manifest: dict[str, object],
    hook: Hook = no_hook,
    built_from: Callable[[dict[int, dict]], None] | None = None,
    audit: Callable[[duckdb.DuckDBPyConnection, Callable[[], Path]], None] | None = None,
    parts_dir: str | None = None,
    rebuild: bool = False,
) -> int:
    """Update customer_profiles, write its export and its snapshot, audit them and record all
    three: all of it or none of it (write, audit, publish).

    `built_from`, if given, is shown the shard manifest the snapshot's rows were read with
    (same transaction) before anything is recorded, and raises if it is not the one
    `manifest` was judged from: on DuckLake no lock keeps shards still meanwhile.

    `con` must have the warehouse attached. `manifest` holds shards_hash and code_version (the
    rest is filled in here). The cost follows what changed: only the shards whose version
    differs from what the published table holds are replaced in the table and the snapshot,
    and the export is merged from per-shard sorted parts kept in `parts_dir` (default:
    `export_parts` beside the snapshot), of which only changed shards' are written. `rebuild`
    (--force) rebuilds the table and the snapshot whole whatever changed. The order:
      1. check both targets (not a directory, their folder can exist), before any change;
      2. build the snapshot in a temp file next to its target (fsynced; see _write_snapshot);
      3. BEGIN; replace the changed shards' rows of customer_profiles in the warehouse (the
         same rows as the snapshot's, by construction), while a thread writes the export
         from the parts to a temp file next to its target (fsynced); `audit(con,
         export)` checks the table (as this transaction sees it) meanwhile, then the export
         (`export()` waits for the thread and names the temp file), and raises if a check
         failed; record the manifest with both files' sha256 and the shard versions;
      4. COMMIT (table + manifest change together);
      5. rename the temp files onto the export and the snapshot (each atomic).
    Any failure up to 4 rolls back and removes the temp files: table, manifest, export and
    snapshot stay byte-identical. A crash between 4 and 5 leaves the new table with the old
    files; the manifest then names sha256s that are not on disk, so the next run rebuilds
    and writes both again (and removes the dead process's temp files).

    The snapshot is never opened once published: a reader holding it (even read-write) keeps
    the file it opened, and the rename gives the next reader the new one.
    """
    target = Path(export_path)
    snapshot = Path(snapshot_path)
    parts = Path(parts_dir) if parts_dir else snapshot.parent / "export_parts"
    check_export_target(export_path)
    check_export_target(str(snapshot))
    for stale in [*_stale_temps(target), *_stale_temps(snapshot)]:
        stale.unlink(missing_ok=True)
    versions = shard_versions(con, shard_count)
    entry = read_profiles_manifest(con, shard_count)
    changed = None if rebuild else _changed_shards(entry, manifest["code_version"], versions)
    # The published snapshot is the base of the new one only if it is the file that publish
    # wrote (hashed, not opened: a reader may hold it).
    snapshot_base = changed if changed is not None and snapshot.is_file() \
        and file_sha256(snapshot) == entry.get("snapshot_sha256") else None
    # The snapshot's written shards include the table's (all of them without a base).
    one_per_key = _one_per_key(con, shard_count, snapshot_base)
    rows_per_shard = sum(int(e["record_count"]) for e in read_manifest(con, shard_count).values()) \
        / max(1, shard_count)
    tmp, snapshot_tmp = _temp_path(target), _temp_path(snapshot)
    table_shards = shard_count if changed is None else len(changed)
    try:
        written = shard_count if snapshot_base is None else len(snapshot_base)
        report_progress("publish", step=f"snapshot: writing {written} of {shard_count} shards")
        with _per_shard_threads(con, rows_per_shard):
            snapshot_sha = _write_snapshot(con, snapshot_tmp, snapshot, shard_count,
                                           one_per_key, snapshot_base, hook)
        try:
            # Read-only: attaching never changes the file, so its sha256 stands.
            con.execute(f"ATTACH {_sql_string(str(snapshot_tmp))} AS {SNAPSHOT} (READ_ONLY)")
            report_progress("publish", step="export: writing the sorted part of each "
                            "changed shard")
            kept = _kept_parts(entry, changed, shard_count, export_path)
            with _per_shard_threads(con, rows_per_shard):
                part_files = _write_parts(con, shard_count, versions, parts, kept)
            base = _patch_base(target, entry, kept, part_files, parts, shard_count)

            def publish_files() -> None:
                con.execute(f"DETACH {SNAPSHOT}")
                hook("export_before_rename")
                with errors.naming(target):
                    os.replace(tmp, target)
                with errors.naming(snapshot):
                    # A WAL beside the old file (someone wrote to it) would be replayed onto
                    # the new one by the next reader.
                    for wal in wal_files(snapshot):
                        wal.unlink(missing_ok=True)
                    os.replace(snapshot_tmp, snapshot)

            def rewrite(shard_id: int) -> Path:
                # A kept part found damaged by the merge (in its thread, on a cursor of its own).
                cur = con.cursor()
                try:
                    with errors.naming(parts):
                        return _write_part(cur, shard_count, shard_id, versions[shard_id], parts)
                finally:
                    cur.close()

            head = _export_header(con, tmp, target)
            # The merge is Python and DuckDB's copy of the shard tables below releases the
            # GIL: the export is written beside it, not after it.
            export = _Background(lambda stop: _write_export(tmp, target, head, part_files,
                                                            hook, stop, base, rewrite))

            def export_written() -> Path:
                report_progress("publish", step="waiting for the export's merge")
                export.result()
                return tmp
            try:
                report_progress("publish", step=f"table: replacing {table_shards} of "
                                f"{shard_count} shards, while the export is "
                                + ("patched" if base else f"merged from {len(part_files)} parts"))
                with transaction(con, after_commit=publish_files):
                    if built_from is not None:
                        built_from(_manifest_in(con, SNAPSHOT, shard_count))
                    # The snapshot's tables: the same rows by construction, already sorted.
                    con.execute("SET preserve_insertion_order = true")
                    with _per_shard_threads(con, rows_per_shard):
                        _replace_shards(con, shard_count, ALIAS, one_per_key, changed, hook,
                                        copy_from=SNAPSHOT)
                    count = int(con.execute(
                        f"SELECT count(*) FROM {ALIAS}.customer_profiles").fetchone()[0])
                    if audit is not None:
                        # The table's checks run while the merge still writes the export; the
                        # export's records and rows are the last facts they wait for.
                        audit(con, export_written)
                    sha, _, how = export.result()
                    report_progress("publish", step=f"export: {how}")
                    _record(con, shard_count, manifest, count, export_path, sha, snapshot_sha,
                            versions, hook)
            except BaseException:
                export.cancel()
                raise
        except BaseException:
            _detach_quietly(con, SNAPSHOT)
            raise
    finally:
        tmp.unlink(missing_ok=True)
        _remove_temp(snapshot_tmp)
    return count


def _record(con: duckdb.DuckDBPyConnection, shard_count: int, manifest: dict[str, object],
            count: int, export_path: str, sha: str, snapshot_sha: str,
            versions: dict[int, str], hook: Hook) -> None:
    """Inside the publish's transaction, once audited: record the manifest naming both files'
    sha256 and the shard versions."""
    # DuckLake has no INSERT OR REPLACE (no primary keys): delete, then insert.
    con.execute(f"DELETE FROM {ALIAS}.profiles_manifest WHERE shard_count = ?",
                [shard_count])
    con.execute(
        f"""INSERT INTO {ALIAS}.profiles_manifest (shard_count,
            shards_hash, code_version, row_count, export_path, export_sha256,
            snapshot_sha256, shard_versions) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
        [shard_count, manifest["shards_hash"], manifest["code_version"], count,
         export_path, sha, snapshot_sha,
         json.dumps({str(k): v for k, v in sorted(versions.items())})],
    )
    # The table now holds this layout: another layout's next publish rebuilds it.
    con.execute(f"UPDATE {ALIAS}.profiles_manifest SET shard_versions = NULL "
                "WHERE shard_count <> ?", [shard_count])
    hook("profiles_before_commit")
