"""Whose tables a warehouse holds, and those tables kept to their pipeline's declaration.

Each pipeline has a warehouse of its own by default, but DUCKDB_PATH (or a component's
`settings.database`) can give two pipelines the same one, and their `shard_profiles`,
manifests and rejected rows would then mix. A warehouse records the name of its pipeline in
`pipeline` on first use; another pipeline's run stops there, in one line, before it writes a
row. A warehouse made before that record belongs to the pipeline whose key its profiles carry.

A declaration edited (a column added, removed, renamed, retyped or moved) changes the columns
of `shard_profiles`, and the shard writes insert by position: into the old table they would
fail or, worse, put values under another column's name. So when the table's columns are not
the declaration's, it is made again, empty, in one transaction that also forgets every shard's
manifest row (the declaration's digest is part of the code version, so every shard was to be
rebuilt anyway); `rejected_rows` too when the key changed, with the sources' manifest rows, so
each source is staged again and its rejected rows recorded under the new key.

A staging folder (STAGING_DIR) or an export (EXPORT_PATH) shared the same way would let two
pipelines replace each other's staged files or export: a marker beside it (`.pipeline` in the
folder, `.<export name>.pipeline`) holds its pipeline's name, checked before a source is
staged there or the export published.
"""

from __future__ import annotations

import functools
import os
import uuid
from pathlib import Path

import duckdb

from etl_assets.lib import ducklake, errors, pipeline
from etl_assets.lib.declaration import SHIPPED, Declaration
from etl_assets.lib.schema import profile_columns


class OtherPipelineError(errors.PathError):
    """The warehouse holds another pipeline's tables."""


def claim(con: duckdb.DuckDBPyConnection, db: str, decl: Declaration | None, shown_path: str,
          tables: tuple[str, ...]) -> None:
    """Record `decl`'s pipeline as the owner of the warehouse attached as `db` if none is,
    refuse another's (OtherPipelineError naming `shown_path`), then make its tables follow
    `decl` (see the module docstring) with `tables`, the statements creating shard_profiles
    and rejected_rows. Idempotent; on a current warehouse, two reads. None: the tables
    every pipeline has are attached, and there is nothing to claim."""
    if decl is None:
        return
    own = pipeline.name(decl.path)
    owner = _owner(con, db)
    if owner is None:  # a new warehouse, or one from before the record
        ducklake.retry_conflicts(lambda: _record(con, db, decl, own, shown_path),
                                 "recording the pipeline")
        owner = _owner(con, db)
    if owner != own:
        raise _other(shown_path, f"pipeline {owner!r}", own)
    if _columns(con, db, "shard_profiles") != _expected(decl):
        ducklake.retry_conflicts(lambda: _reshape(con, db, decl, tables),
                                 "following the declaration")


def claim_folder(folder: Path, own: str) -> None:
    """Record pipeline `own` as the owner of staging `folder` if none is; OtherPipelineError
    naming the folder if another pipeline is."""
    _claim_marker(folder / ".pipeline", own, folder, "staged files", "STAGING_DIR")


def claim_export(export: Path, own: str) -> None:
    """The same for the export file (and the snapshot named after it on DuckLake), with its
    marker `.<name>.pipeline` beside it: checked before a publish writes either."""
    _claim_marker(export.parent / f".{export.name}.pipeline", own, export, "export",
                  "EXPORT_PATH")


def _claim_marker(marker: Path, own: str, shown: Path, what: str, variable: str) -> None:
    if not marker.is_file():
        with errors.naming(shown):
            marker.parent.mkdir(parents=True, exist_ok=True)
            draft = marker.parent / f"{marker.name}.{uuid.uuid4().hex}"
            draft.write_text(own + "\n", encoding="utf-8")
            try:
                os.link(draft, marker)  # the first pipeline to get here owns it
            except FileExistsError:
                pass
            finally:
                draft.unlink()
    owner = marker.read_text(encoding="utf-8").strip()
    if owner != own:
        raise _other(str(shown), f"pipeline {owner!r}", own, what, variable)


def _other(shown_path: str, owner: str, own: str, what: str = "tables",
           variable: str = "DUCKDB_PATH") -> OtherPipelineError:
    return OtherPipelineError(
        shown_path, f"holds the {what} of {owner}, not of pipeline {own!r}: give each pipeline "
        f"its own (without {variable}, {own!r} has them under "
        f"{pipeline.folder(Path('<home>'), '' if own == SHIPPED.stem else own)}/)")


def _owner(con: duckdb.DuckDBPyConnection, db: str) -> str | None:
    return con.execute(f"SELECT min(name) FROM {db}.pipeline").fetchone()[0]


def _record(con: duckdb.DuckDBPyConnection, db: str, decl: Declaration, own: str,
            shown_path: str) -> None:
    con.execute("BEGIN")
    if con.execute(f"SELECT count(*) FROM {db}.pipeline").fetchone()[0] == 0:
        # Made before the record: the pipeline whose key its profiles carry first owns it.
        first = next(iter(_columns(con, db, "shard_profiles")), ("", ""))[0]
        used = con.execute(f"SELECT (SELECT count(*) FROM {db}.shard_manifest) + "
                           f"(SELECT count(*) FROM {db}.source_manifest)").fetchone()[0]
        if used and first != decl.key:
            raise _other(shown_path, f"another pipeline (keyed on {first})", own)
        con.execute(f"INSERT INTO {db}.pipeline VALUES (?)", [own])
    con.execute("COMMIT")


def _columns(con: duckdb.DuckDBPyConnection, db: str, table: str) -> tuple[tuple[str, str], ...]:
    """(name, DuckDB type) of each column of `db`.`table`, in order."""
    return tuple(tuple(row) for row in con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = ? "
        "AND schema_name = 'main' AND table_name = ? ORDER BY column_index",
        [db, table]).fetchall())


@functools.lru_cache(maxsize=16)
def _expected(decl: Declaration) -> tuple[tuple[str, str], ...]:
    """shard_profiles' columns as DuckDB spells their types (a table of the same DDL in a
    connection of its own), worked out once per process and declaration, not on each attach."""
    columns = ", ".join(f"{name} {sql_type}" for name, sql_type in profile_columns(decl))
    with duckdb.connect() as con:
        con.execute(f"CREATE TABLE expected_shape ({columns}, shard_count INTEGER)")
        return _columns(con, "memory", "expected_shape")


def _reshape(con: duckdb.DuckDBPyConnection, db: str, decl: Declaration,
             tables: tuple[str, ...]) -> None:
    con.execute("BEGIN")
    if _columns(con, db, "shard_profiles") != _expected(decl):  # not done meanwhile
        con.execute(f"DROP TABLE {db}.shard_profiles")
        con.execute(f"DELETE FROM {db}.shard_manifest")
        if decl.key not in dict(_columns(con, db, "rejected_rows")):
            con.execute(f"DROP TABLE {db}.rejected_rows")
            con.execute(f"DELETE FROM {db}.source_manifest")
        for statement in tables:
            con.execute(statement)
    con.execute("COMMIT")
