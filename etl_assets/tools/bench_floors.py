"""The bench's floors for any declaration: the least work a pipeline making its profiles does."""

# Each floor is a DuckDB query or a few, with no validation, quarantine, staging manifests,
# transactions or Dagster: the plain floor (the key, the shared columns and the derived ones:
# one query reading every source, joining and deriving with the declaration's own macros), the
# full-width floor (every profile column sorted by the key into a table, then the CSV export)
# and the phase floors (one query per phase's work, timed one after the other). The bench runs
# each in a process of its own, `python -m etl_assets.tools.bench_floors KIND PIPELINE DATA
# WORKDIR [SHARDS]`, so its wall time and peak RSS are measured like a run's.

from __future__ import annotations

import codecs
import csv
import json
import sys
import time
from pathlib import Path

import duckdb

from etl_assets.lib import pipeline
from etl_assets.lib.declaration import Declaration, SourceSchema
from etl_assets.lib.paths import duckdb_literal
from etl_assets.lib.rules import install_rules, merge_sql
from etl_assets.lib.warehouse import sql_string


def quote(name: str) -> str:
    """An identifier from the declaration, quoted for SQL."""
    return '"' + name.replace('"', '""') + '"'


def read_types(path: Path, source: SourceSchema) -> dict[str, str]:
    """read_csv's `columns` for `path`: its header's columns in file order, each with its
    declared type (an undeclared one as text), so no type is sniffed and every derived
    expression sees the types it was checked against; ValueError when a column is missing."""
    with open(path, "rb") as fh:
        header = codecs.decode(fh.readline(), "utf-8-sig")
    names = next(csv.reader([header]))
    declared = {c.name: c.sql_type for c in source.columns}
    missing = [c for c in declared if c not in names]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)} in its header")
    return {name: declared.get(name, "VARCHAR") for name in names}


def _read(i: int) -> str:
    return f"read_csv($file_{i}, header = true, columns = $types_{i})"


def _read_params(decl: Declaration, data: Path) -> dict[str, object]:
    params: dict[str, object] = {}
    for i, source in enumerate(decl.sources):
        path = data / source.filename
        params |= {f"file_{i}": duckdb_literal(path), f"types_{i}": read_types(path, source)}
    return params


def merged_sql(decl: Declaration) -> str:
    """`WITH <source> AS (its file), ..., merged AS (...)`: every source's rows joined on the
    key, a shared column from its carriers in preference order (the pipeline's merge rule)."""
    key = quote(decl.key)
    reads = [f"{quote(s.name)} AS (SELECT * FROM {_read(i)})" for i, s in enumerate(decl.sources)]
    fields = [key]
    for column, _ in decl.merged_columns()[1:]:
        carriers = [f"{quote(s)}.{quote(column)}" for s in decl.carriers(column)]
        value = carriers[0] if len(carriers) == 1 else f"coalesce({', '.join(carriers)})"
        fields.append(f"{value} AS {quote(column)}")
    # FULL JOIN ... USING: the key is the first non-null of the joined ones, as in the merge.
    joins = " FULL JOIN ".join(
        quote(s.name) + (f" USING ({key})" if i else "") for i, s in enumerate(decl.sources))
    return (f"WITH {', '.join(reads)},\nmerged AS (SELECT {', '.join(fields)}\n"
            f"  FROM {joins})")


def _derived(decl: Declaration, columns: list[str]) -> str:
    exprs = {d.name: d.select_sql for d in decl.derived}
    return ", ".join(exprs.get(c, quote(c)) for c in columns)


def plain_floor_sql(decl: Declaration) -> str:
    """The key, the shared columns (the preferred source's value first) and the derived ones."""
    columns = [decl.key, *(c for c, _ in decl.prefer), *(d.name for d in decl.derived)]
    return f"{merged_sql(decl)}\nSELECT {_derived(decl, columns)} FROM merged"


def full_floor_sql(decl: Declaration) -> str:
    """Every profile column in export order, sorted by the key."""
    return (f"{merged_sql(decl)}\nSELECT {_derived(decl, list(decl.export))} FROM merged "
            f"ORDER BY {quote(decl.key)}")


def plain_floor(con: duckdb.DuckDBPyConnection, decl: Declaration, data: Path) -> int:
    """The plain floor into table `profiles`; its row count."""
    install_rules(con, decl)
    con.execute(f"CREATE OR REPLACE TABLE profiles AS {plain_floor_sql(decl)}",
                _read_params(decl, data))
    return con.execute("SELECT count(*) FROM profiles").fetchone()[0]


def full_floor(con: duckdb.DuckDBPyConnection, decl: Declaration, data: Path, out: Path) -> int:
    """The full-width floor into table `profiles`, exported as CSV to `out`; its row count."""
    install_rules(con, decl)
    con.execute(f"CREATE OR REPLACE TABLE profiles AS {full_floor_sql(decl)}",
                _read_params(decl, data))
    con.execute("COPY profiles TO $out (FORMAT csv, HEADER true)", {"out": str(out)})
    return con.execute("SELECT count(*) FROM profiles").fetchone()[0]


def phase_floors(con: duckdb.DuckDBPyConnection, decl: Declaration, data: Path, staged: Path,
                 out: Path, shards: int) -> dict[str, float]:
    """Each phase's work timed on its own: sources (read each file with its types, write it as
    Parquet split by shard), shards (the pipeline's merge query over the staged sets into one
    table), profiles + checks (that table sorted by the key, its CSV export, one pass counting
    rows, distinct keys and idempotency keys). Seconds per phase."""
    install_rules(con, decl)
    staged.mkdir(parents=True, exist_ok=True)
    key, params, times = quote(decl.key), _read_params(decl, data), {}
    started = time.monotonic()
    for i, source in enumerate(decl.sources):
        con.execute(
            f"COPY (SELECT *, md5({key}) AS row_hash, etl_shard({key}, $n) AS shard_id "
            f"FROM {_read(i)}) TO $dir (FORMAT parquet, PARTITION_BY (shard_id))",
            {f"file_{i}": params[f"file_{i}"], f"types_{i}": params[f"types_{i}"], "n": shards,
             "dir": str(staged / source.name)})
    times["sources_s"] = time.monotonic() - started
    started = time.monotonic()
    for source in decl.sources:
        # A view cannot hold a bound parameter: the path goes in as a SQL literal, the folder
        # (under the user's --out) escaped so that only the slices' own pattern is one.
        glob = sql_string(f"{duckdb_literal(staged / source.name)}/*/*.parquet")
        con.execute(f"CREATE VIEW {quote(source.name)} AS SELECT * EXCLUDE (shard_id) FROM "
                    f"read_parquet({glob}, hive_partitioning = true)")
    con.execute(f"CREATE TABLE shard_profiles AS {merge_sql(decl)}", {"shard_id": 0})
    times["shards_s"] = time.monotonic() - started
    started = time.monotonic()
    con.execute(f"CREATE TABLE profiles AS SELECT * FROM shard_profiles ORDER BY {key}")
    con.execute("COPY profiles TO $out (FORMAT csv, HEADER true)", {"out": str(out)})
    con.execute(f"SELECT count(*), count(DISTINCT {key}), count(DISTINCT idempotency_key) "
                "FROM profiles").fetchall()
    times["profiles_s"] = time.monotonic() - started
    return {k: round(v, 2) for k, v in times.items()}


def main(argv: list[str]) -> None:
    """KIND PIPELINE DATA WORKDIR [SHARDS]: one floor (plain, full or phases; PIPELINE "" is
    the shipped declaration), its database and files in WORKDIR; prints the row count (plain,
    full) or the phase times as JSON (phases)."""
    kind, path, data, work = argv[0], argv[1], Path(argv[2]), Path(argv[3])
    decl = pipeline.declaration(path)
    con = duckdb.connect(str(work / f"{kind}.duckdb"))
    con.execute("SET enable_progress_bar = false")
    try:
        if kind == "plain":
            print(plain_floor(con, decl, data))
        elif kind == "full":
            print(full_floor(con, decl, data, work / "full.csv"))
        elif kind == "phases":
            print(json.dumps(phase_floors(con, decl, data, work / "phases_staged",
                                          work / "phases.csv", int(argv[4]))))
        else:
            raise SystemExit(f"unknown floor {kind!r} (plain, full or phases)")
    finally:
        con.close()


if __name__ == "__main__":
    main(sys.argv[1:])
