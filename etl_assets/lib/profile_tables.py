"""customer_profiles as one table per shard (`customer_profiles_shard_<k>`) under one view:
replacing the shards that changed, one row per idempotency key, side by side on cursors.

Used by the publish (`publish`) on the warehouse and on the snapshot it writes; the table alone
is rebuilt by `rebuild_customer_profiles` (tests and tools).
"""

from __future__ import annotations

import json
import queue
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress

import duckdb

from etl_assets.lib.faults import Hook, injected, no_hook
from etl_assets.lib.limits import cores
from etl_assets.lib.warehouse import ALIAS, T, read_manifest, transaction


def one_per_key_sql(con: duckdb.DuckDBPyConnection, shard_count: int,
                 shards: list[int] | None = None) -> str:
    """The QUALIFY that keeps one row per idempotency key in the rows of `shards` (default:
    all), or "" when the probe (in the caller's transaction) finds none repeated there: keys
    are normally unique already, and the window is costly (docs/performance.md). A key starts
    with its customer_id, which routes to one shard, so a repeated key is always within one
    shard, and only the shards about to be written need probing."""
    repeated = con.execute(
        f"""SELECT count(*) > count(DISTINCT idempotency_key) FROM {ALIAS}.shard_profiles
            WHERE shard_count = $n AND ($all OR list_contains($shards, shard_id))""",
        {"n": shard_count, "all": shards is None, "shards": shards or []},
    ).fetchone()[0]
    return ("QUALIFY row_number() OVER (PARTITION BY idempotency_key ORDER BY shard_id) = 1"
            if repeated else "")


def _shard_rows_sql(one_per_key: str) -> str:
    """One shard's profile rows, sorted by the key (parameters: shard_count, shard_id): the
    table's columns are the profile's (schema.profile_columns, the key first) and shard_count,
    whatever the pipeline."""
    return (f"SELECT * EXCLUDE (shard_count) FROM {ALIAS}.shard_profiles "
            f"WHERE shard_count = ? AND shard_id = ? {one_per_key} ORDER BY 1")


PROFILES_TABLE = "customer_profiles"  # the shipped pipeline's merged table


def shard_table(table: str, shard_id: int | str) -> str:
    """The table of one shard's rows of `table` (`customer_profiles_shard_3`)."""
    return f"{table}_shard_{shard_id}"


def replace_shards(
    con: duckdb.DuckDBPyConnection, shard_count: int, db: str, one_per_key: str,
    shards: list[int] | None = None, hook: Hook = no_hook, copy_from: str | None = None,
    table: str = PROFILES_TABLE,
) -> None:
    """Inside the caller's transaction: make `db`.`table` hold the current shard
    layout, one row per idempotency key. `shards` None: every shard; otherwise only those (the
    others already hold their current rows: the cost follows what changed). With `copy_from`
    (the snapshot being published, attached), each shard's table is copied from its table
    there, already sorted, rather than sorted again from shard_profiles.

    customer_profiles is a view, `UNION ALL` over one table per shard (each sorted by
    customer_id), so replacing a shard writes that shard's table alone and drops the old one.
    One table with a DELETE and INSERT per shard was measured first: a shard's rows are spread
    over every row group, and the checkpoint's vacuum then rewrote most of the table
    (docs/performance.md). The view names its tables without a catalog, so it
    resolves in whichever database holds it: the warehouse or the snapshot, under any alias.
    At the `merge_duplicate` fault (the warehouse's table only) shard 0's first row is written
    twice, for the test that the audit stops it.
    """
    write_shard_tables(con, shard_count, db, one_per_key,
                        range(shard_count) if shards is None else shards, copy_from, table=table)
    tables = {row[0]: row[1] for row in con.execute(
        """SELECT table_name, 'TABLE' FROM duckdb_tables() WHERE database_name = ?
           UNION ALL SELECT view_name, 'VIEW' FROM duckdb_views() WHERE database_name = ?""",
        [db, db]).fetchall()}
    if tables.get(table) == "TABLE":  # written by older code
        con.execute(f"DROP TABLE {db}.{table}")
    current = [shard_table(table, k) for k in range(shard_count)]
    for name in tables:
        # Another layout's shard tables: no longer part of the table.
        if name.startswith(shard_table(table, "")) and name not in current:
            con.execute(f'DROP TABLE {db}."{name}"')
    con.execute(f"CREATE OR REPLACE VIEW {db}.{table} AS "
                + " UNION ALL ".join(f"SELECT * FROM {name}" for name in current))
    if injected(hook, "merge_duplicate"):
        first = f"{db}.{current[0]}"
        con.execute(f"INSERT INTO {first} SELECT * FROM {first} ORDER BY 1 LIMIT 1")


def write_shard_tables(
    con: duckdb.DuckDBPyConnection, shard_count: int, db: str, one_per_key: str,
    shards: Iterable[int], copy_from: str | None = None, parallel: bool = False,
    table: str = PROFILES_TABLE,
) -> None:
    """(Re)write `db`'s table of each of `shards` (see replace_shards). `parallel`: each table
    in its own transaction, on its own cursor, up to one per core (only where no transaction
    must hold them all: the snapshot's temp file)."""
    def task(shard_id: int) -> Callable[[duckdb.DuckDBPyConnection], None]:
        own = shard_table(table, shard_id)

        def write(cur: duckdb.DuckDBPyConnection) -> None:
            if copy_from:
                cur.execute(f"CREATE OR REPLACE TABLE {db}.{own} AS "
                            f"SELECT * FROM {copy_from}.{own}")
            else:
                cur.execute(f"CREATE OR REPLACE TABLE {db}.{own} AS "
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
    groups use one DuckDB thread each (see per_shard_threads), so running them side by side
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


def rebuild_table(con: duckdb.DuckDBPyConnection, shard_count: int,
                  table: str = PROFILES_TABLE) -> int:
    """Inside the caller's transaction: rebuild the warehouse's `table` whole from the current
    shard layout; return its row count."""
    replace_shards(con, shard_count, ALIAS, one_per_key_sql(con, shard_count), table=table)
    return int(con.execute(f"SELECT count(*) FROM {ALIAS}.{table}").fetchone()[0])


def shard_versions(con: duckdb.DuckDBPyConnection, shard_count: int) -> dict[int, str]:
    """shard_id -> the version of its rows in shard_profiles: its manifest entry (written in
    the same transaction as the rows), run_id included so a forced rebuild counts as a change."""
    return {k: f"{e['source_data_hash']}|{e['code_version']}|{e['record_count']}|{e['run_id']}"
            for k, e in read_manifest(con, shard_count).items()}


# DuckDB's row group: the unit it parallelizes a scan or a write over.
ROW_GROUP_ROWS = 122_880


@contextmanager
def per_shard_threads(con: duckdb.DuckDBPyConnection, rows_per_shard: float) -> Iterator[None]:
    """One DuckDB thread for the per-shard statements when a shard is smaller than two row
    groups, then the connection's own setting again.

    DuckDB splits work by row group, so a second thread has nothing of its own to do on a
    shard table of one row group and only adds overhead (docs/performance.md, "Tried and not
    kept"). Larger shards (10M customers) keep every thread.
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


def changed_shards(entry: dict | None, code_version: object,
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
        count = rebuild_table(con, shard_count)
        con.execute(f"DELETE FROM {ALIAS}.profiles_manifest")
    return count
