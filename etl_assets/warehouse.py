"""The DuckDB warehouse: connections under a lock policy, and the transactional writes.

DuckDB lets one process hold a database file read-write. Heavy work happens in scratch in-memory
connections; the warehouse file is attached only for the short write, which runs in one
transaction and is always followed by DETACH/close, even when it fails.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import duckdb

from etl_assets.faults import Hook, no_hook
from etl_assets.limits import DuckDBLimits
from etl_assets.schema import profile_columns

ALIAS = "wh"
_LOCK_HOLDER = re.compile(r"PID (\d+)")


class WarehouseLockedError(RuntimeError):
    """The warehouse file stayed locked by another process for longer than the lock timeout."""


def _profile_ddl(extra: str = "") -> str:
    cols = ", ".join(f"{name} {sql_type}" for name, sql_type in profile_columns())
    return f"({cols}{extra})"


# Tables are created on first use; the statements are idempotent.
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
    f"""CREATE TABLE IF NOT EXISTS {ALIAS}.rejected_rows (
        source VARCHAR, line_number BIGINT, customer_id VARCHAR, reason VARCHAR, raw VARCHAR,
        file_sha256 VARCHAR)""",
)


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
                    f"{path}: still locked by {_holder(message)} after {timeout_s:.0f}s"
                ) from exc
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())) * random.uniform(0.5, 1.0))
            wait = min(wait * 2, 2.0)


@contextmanager
def attached(con: duckdb.DuckDBPyConnection, path: str, timeout_s: float) -> Iterator[str]:
    """Attach the warehouse file to `con` as `wh` for a short write; always detach afterwards."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _with_lock_retry(lambda: con.execute(f"ATTACH ? AS {ALIAS}", [path]), path, timeout_s)
    try:
        for ddl in DDL:
            con.execute(ddl)
        yield ALIAS
    finally:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # no transaction open: the normal case
        con.execute(f"DETACH {ALIAS}")


@contextmanager
def scratch(limits: Optional[DuckDBLimits] = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB connection for heavy work, closed whatever happens.

    With `limits`, DuckDB keeps to the memory limit by spilling to the temp directory.
    """
    config: dict[str, object] = {}
    spill_dir: Optional[str] = None
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
        finally:
            con.close()
    finally:
        if spill_dir is not None:
            shutil.rmtree(spill_dir, ignore_errors=True)


@contextmanager
def reader(
    path: str, timeout_s: float, limits: Optional[DuckDBLimits] = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A scratch connection with the warehouse attached (for reads and short writes)."""
    with scratch(limits) as con, attached(con, path, timeout_s):
        yield con


@contextmanager
def read_only(
    path: str, timeout_s: float, limits: Optional[DuckDBLimits] = None
) -> Iterator[Optional[duckdb.DuckDBPyConnection]]:
    """A scratch connection with the warehouse attached READ_ONLY as `wh`, or None when there
    is no warehouse file yet.

    For decisions that only read (is a source or shard current?): a user's read-only
    connection to the warehouse (a notebook, the DuckDB CLI) does not block them, and they
    never create a file or a table.
    """
    if not Path(path).is_file():
        yield None
        return
    with scratch(limits) as con:
        _with_lock_retry(lambda: con.execute(f"ATTACH ? AS {ALIAS} (READ_ONLY)", [path]),
                         path, timeout_s)
        try:
            yield con
        finally:
            con.execute(f"DETACH {ALIAS}")


def _has_table(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    return con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND table_name = ?",
        [ALIAS, table]).fetchone()[0] > 0


def overwrite_shard(
    con: duckdb.DuckDBPyConnection,
    rows_table: str,
    *,
    shard_count: int,
    shard_id: int,
    manifest: dict[str, object],
    hook: Hook = no_hook,
) -> int:
    """Replace one shard's rows and manifest entry in ONE transaction; return the rows written.

    `con` must have the warehouse attached (see `attached`). `rows_table` holds the new profile
    rows. `hook` is called at the fault points inside the transaction; if anything raises
    (or the process dies) before COMMIT, the old rows stay.
    """
    con.execute("BEGIN TRANSACTION")
    try:
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
        con.execute(
            f"INSERT OR REPLACE INTO {ALIAS}.shard_manifest VALUES (?, ?, ?, ?, ?, ?)",
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
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return int(written)


def read_source_manifest(con: duckdb.DuckDBPyConnection, source: str) -> Optional[dict]:
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
    cur = con.execute(
        f"SELECT shard_id, source_data_hash, code_version, record_count, run_id "
        f"FROM {ALIAS}.shard_manifest WHERE shard_count = ?",
        [shard_count],
    )
    names = [d[0] for d in cur.description]
    return {int(row[0]): dict(zip(names[1:], row[1:], strict=True)) for row in cur.fetchall()}


def read_profiles_manifest(con: duckdb.DuckDBPyConnection, shard_count: int) -> Optional[dict]:
    """The last customer_profiles build for this layout (see record_profiles), or None."""
    cur = con.execute(f"SELECT * FROM {ALIAS}.profiles_manifest WHERE shard_count = ?",
                      [shard_count])
    row = cur.fetchone()
    return dict(zip([d[0] for d in cur.description], row, strict=True)) if row else None


def record_profiles(con: duckdb.DuckDBPyConnection, shard_count: int, entry: dict) -> None:
    """Record a finished rebuild + export: shards_hash, code_version, row_count, export_path,
    export_sha256. Written after the export is in place, so a crash before leaves no record."""
    con.execute(
        f"INSERT OR REPLACE INTO {ALIAS}.profiles_manifest VALUES (?, ?, ?, ?, ?, ?)",
        [shard_count, entry["shards_hash"], entry["code_version"], entry["row_count"],
         entry["export_path"], entry["export_sha256"]],
    )


def replace_rejected(
    con: duckdb.DuckDBPyConnection,
    source: str,
    rejected_table: str,
    file_sha256: str,
    manifest: dict[str, object],
) -> None:
    """Replace a source's quarantined rows and its manifest row in one transaction.

    `manifest` holds staging_key, rows_read, rows_accepted, rows_rejected and reasons (JSON).
    """
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(f"DELETE FROM {ALIAS}.rejected_rows WHERE source = ?", [source])
        con.execute(
            f"INSERT INTO {ALIAS}.rejected_rows SELECT ?, line_number, customer_id, reason, raw, ? "
            f"FROM {rejected_table} ORDER BY line_number",
            [source, file_sha256],
        )
        con.execute(
            f"INSERT OR REPLACE INTO {ALIAS}.source_manifest VALUES (?, ?, ?, ?, ?, ?, ?)",
            [source, file_sha256, manifest["staging_key"], manifest["rows_read"],
             manifest["rows_accepted"], manifest["rows_rejected"], manifest["reasons"]],
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def rebuild_customer_profiles(
    con: duckdb.DuckDBPyConnection, shard_count: int, hook: Hook = no_hook
) -> int:
    """Rebuild `customer_profiles` from the current shard layout, one row per idempotency key."""
    cols = ", ".join(name for name, _ in profile_columns())
    con.execute("BEGIN TRANSACTION")
    try:
        # Keys are normally unique already; the window that keeps one row per key costs about
        # 0.4 s per 1M rows, so it runs only when the probe (same transaction) finds a repeat.
        repeated = con.execute(
            f"""SELECT count(*) > count(DISTINCT idempotency_key) FROM {ALIAS}.shard_profiles
                WHERE shard_count = ?""",
            [shard_count],
        ).fetchone()[0]
        one_per_key = (
            "QUALIFY row_number() OVER (PARTITION BY idempotency_key ORDER BY shard_id) = 1"
            if repeated else ""
        )
        con.execute(
            f"""CREATE OR REPLACE TABLE {ALIAS}.customer_profiles AS
                SELECT {cols} FROM {ALIAS}.shard_profiles WHERE shard_count = ?
                {one_per_key}
                ORDER BY customer_id""",
            [shard_count],
        )
        count = con.execute(f"SELECT count(*) FROM {ALIAS}.customer_profiles").fetchone()[0]
        # The record of what the table was built from no longer holds, whatever happens next
        # (record_profiles writes the new one once the export is in place).
        con.execute(f"DELETE FROM {ALIAS}.profiles_manifest")
        hook("profiles_before_commit")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return int(count)


def export_csv(con: duckdb.DuckDBPyConnection, export_path: str, hook: Hook = no_hook) -> None:
    """Write customer_profiles sorted by customer_id; the file appears complete or not at all."""
    target = Path(export_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        # The table is written in customer_id order (rebuild_customer_profiles) and DuckDB keeps
        # insertion order when a query has no ORDER BY (preserve_insertion_order, on by
        # default and set here), so the export needs no second sort of every row.
        con.execute("SET preserve_insertion_order = true")
        con.execute(
            f"COPY (SELECT * FROM {ALIAS}.customer_profiles) TO ? "
            "(FORMAT csv, HEADER true, DELIMITER ',')",
            [str(tmp)],
        )
        hook("export_before_rename")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
