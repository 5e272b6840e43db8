"""Publishing customer_profiles: the table, its export and its snapshot, all or nothing.

`publish_customer_profiles` reads top to bottom as the protocol's steps: check the targets,
write the snapshot to a temp file, write the changed shards' export parts, then in one
transaction replace the changed shards while a thread merges the export, audit
table and export, record the manifest, COMMIT, and rename both files into place.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import duckdb

from etl_assets.lib import errors, export_parts, ownership
from etl_assets.lib.declaration import SHIPPED
from etl_assets.lib.events import report_progress
from etl_assets.lib.faults import Hook, no_hook
from etl_assets.lib.files import (
    HashingWriter,
    check_export_target,
    file_sha256,
    remove_temp,
    stale_temps,
    stale_temps_in,
    temp_path,
    wal_files,
    write_durably,
)
from etl_assets.lib.profile_tables import (
    PROFILES_TABLE,
    changed_shards,
    in_parallel,
    one_per_key_sql,
    per_shard_threads,
    replace_shards,
    shard_table,
    shard_versions,
    write_shard_tables,
)
from etl_assets.lib.schema import profile_columns
from etl_assets.lib.settings import EtlSettings
from etl_assets.lib.warehouse import (
    ALIAS,
    detach_quietly,
    manifest_in,
    read_manifest,
    read_profiles_manifest,
    sql_string,
    transaction,
)

log = logging.getLogger(__name__)

Columns = tuple[tuple[str, str], ...]  # (name, SQL type) of each profile column, the key first


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
    changed: list[int] | None, hook: Hook, table: str = PROFILES_TABLE,
) -> str:
    """Build the snapshot in `tmp`, durably: the `table` this publish will commit
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
        con.execute(f"ATTACH {sql_string(str(tmp))} AS {SNAPSHOT}")
        try:
            # A temp file nobody reads until it is renamed into place: its shard tables need
            # no common transaction, so they are written side by side.
            write_shard_tables(con, shard_count, SNAPSHOT, one_per_key,
                                range(shard_count) if changed is None else changed,
                                parallel=True, table=table)
            with transaction(con):
                # No fault hook: the export's parts are read from here and kept.
                replace_shards(con, shard_count, SNAPSHOT, one_per_key, [], table=table)
                for copied, order in SNAPSHOT_TABLES.items():
                    con.execute(f"CREATE OR REPLACE TABLE {SNAPSHOT}.{copied} AS "
                                f"SELECT * FROM {ALIAS}.{copied} ORDER BY {order}")
                hook("snapshot_write")
            # DETACH checkpoints: the file is complete (no WAL beside it) once it returns.
            con.execute(f"DETACH {SNAPSHOT}")
        except BaseException:
            detach_quietly(con, SNAPSHOT)  # the transaction has already rolled back
            raise
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    return file_sha256(tmp)


def _write_parts(con: duckdb.DuckDBPyConnection, shard_count: int, versions: dict[int, str],
                 parts_dir: Path, columns: Columns, table: str) -> list[Path]:
    """Each shard's sorted CSV part, written only where its version has none yet (see
    export_parts); older parts of this layout and dead processes' temp files are removed.

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
                cur, shard_count, shard_id, version, parts_dir, columns, table)

        # Each part read and written on its own cursor, side by side (see in_parallel).
        parts = in_parallel(con, [part(k, v) for k, v in sorted(versions.items())])
        keep = {p.name for p in parts}
        for old in parts_dir.glob(f"{shard_count}-*.csv"):
            if old.name not in keep:
                old.unlink(missing_ok=True)
        for stale in stale_temps_in(parts_dir):
            stale.unlink(missing_ok=True)
    return parts


def _write_part(cur: duckdb.DuckDBPyConnection, shard_count: int, shard_id: int, version: str,
                parts_dir: Path, columns: Columns, table: str) -> Path:
    """Write one shard version's part from its table in the snapshot being published."""
    text = [name for name, sql_type in columns if sql_type == "VARCHAR"]
    return export_parts.write_part(
        cur, f"SELECT * FROM {SNAPSHOT}.{shard_table(table, shard_id)}", text,
        parts_dir, export_parts.part_prefix(shard_count, shard_id, version), key=columns[0][0])


def _parts_of(parts_dir: Path, shard_count: int, shard_id: int, version: str) -> list[Path]:
    """The part files written for one shard version (one, or none yet). A part whose name
    records no sha256 (written by older code) is not one: nothing could prove it."""
    prefix = export_parts.part_prefix(shard_count, shard_id, version)
    return [p for p in sorted(parts_dir.glob(f"{glob.escape(prefix)}*.csv"))
            if export_parts.recorded_sha256(p)]


def _export_header(con: duckdb.DuckDBPyConnection, tmp: Path, target: Path,
                   columns: Columns, table: str) -> bytes:
    """The export's header line, as DuckDB writes it for customer_profiles' columns (read from
    the snapshot being published: the same view as the warehouse's). Creates `tmp` empty first,
    so that a missing permission is an OSError naming the problem rather than DuckDB's wording
    of it. Errors name `target`: the path a user gave and has to fix or free space for."""
    cols = ", ".join(name for name, _ in columns)
    with errors.naming(target):
        with open(tmp, "xb"):
            pass
        return export_parts.header(con, f"SELECT {cols} FROM {SNAPSHOT}.{table} LIMIT 0",
                                   tmp.with_name(tmp.name + ".head"))


def _write_export(tmp: Path, target: Path, head: bytes, parts: list[Path], hook: Hook,
                  stop: threading.Event | None = None,
                  rewrite: Callable[[int], Path] | None = None) -> tuple[str, int, str]:
    """Write the export to `tmp` (made by _export_header), durably: `head`, then the shards'
    sorted parts merged on their key (export_parts); return its sha256, how many records it
    holds (both taken from the bytes as they are written) and how it was written. Stops
    (MergeStopped) once `stop` is set. Errors name `target`.

    A part found damaged as it is merged (not the bytes its name records, cut short, out of
    order) is written again by `rewrite(shard_id)` from the table, with one warning line, and
    the merge starts over; without `rewrite` the merge's PartDamagedError is raised."""
    parts = list(parts)
    with errors.naming(target):
        written = None
        how = f"merged from {len(parts)} parts"

        def merged(out: BinaryIO) -> tuple[int, str]:
            writer = HashingWriter(out)
            return export_parts.merge(head, parts, writer, stop), writer.digest.hexdigest()

        rounds = 0
        while written is None:
            try:
                written = write_durably(tmp, merged)
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


@dataclass(frozen=True)
class Targets:
    """Where customer_profiles is published: the layout, the export and the snapshot, the
    folder of the export's kept parts, whether to rebuild whole (--force), and the profile's
    columns (the key first), table and pipeline (default: the shipped pipeline's)."""

    shard_count: int
    export_path: str
    snapshot_path: str
    parts_dir: str
    rebuild: bool = False
    columns: Columns = tuple(profile_columns())
    table: str = PROFILES_TABLE
    pipeline: str = SHIPPED.stem

    @classmethod
    def of(cls, settings: EtlSettings) -> Targets:
        return cls(settings.shard_count, settings.export_path, settings.snapshot_path,
                   settings.export_parts_dir, settings.force,
                   tuple(profile_columns(settings.declaration)), settings.profiles_table,
                   settings.pipeline_name)


def publish_customer_profiles(
    con: duckdb.DuckDBPyConnection,
    targets: Targets,
    manifest: dict[str, object],
    hook: Hook = no_hook,
    built_from: Callable[[dict[int, dict]], None] | None = None,
    audit: Callable[[duckdb.DuckDBPyConnection, Callable[[], Path]], None] | None = None,
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
    `targets.parts_dir`), of which only changed shards' are written. `targets.rebuild`
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
    shard_count, export_path, rebuild = targets.shard_count, targets.export_path, targets.rebuild
    target, snapshot, parts = Path(export_path), Path(targets.snapshot_path), Path(targets.parts_dir)
    check_export_target(export_path)
    check_export_target(str(snapshot))
    ownership.claim_export(target, targets.pipeline)
    for stale in [*stale_temps(target), *stale_temps(snapshot)]:
        stale.unlink(missing_ok=True)
    versions = shard_versions(con, shard_count)
    entry = read_profiles_manifest(con, shard_count)
    changed = None if rebuild else changed_shards(entry, manifest["code_version"], versions)
    # The published snapshot is the base of the new one only if it is the file that publish
    # wrote (hashed, not opened: a reader may hold it).
    snapshot_base = changed if changed is not None and snapshot.is_file() \
        and file_sha256(snapshot) == entry.get("snapshot_sha256") else None
    # The snapshot's written shards include the table's (all of them without a base).
    one_per_key = one_per_key_sql(con, shard_count, snapshot_base)
    rows_per_shard = sum(int(e["record_count"]) for e in read_manifest(con, shard_count).values()) \
        / max(1, shard_count)
    tmp, snapshot_tmp = temp_path(target), temp_path(snapshot)
    table_shards = shard_count if changed is None else len(changed)
    try:
        written = shard_count if snapshot_base is None else len(snapshot_base)
        report_progress("publish", step=f"snapshot: writing {written} of {shard_count} shards")
        with per_shard_threads(con, rows_per_shard):
            snapshot_sha = _write_snapshot(con, snapshot_tmp, snapshot, shard_count,
                                           one_per_key, snapshot_base, hook, targets.table)
        try:
            # Read-only: attaching never changes the file, so its sha256 stands.
            con.execute(f"ATTACH {sql_string(str(snapshot_tmp))} AS {SNAPSHOT} (READ_ONLY)")
            report_progress("publish", step="export: writing the sorted part of each "
                            "changed shard")
            with per_shard_threads(con, rows_per_shard):
                part_files = _write_parts(con, shard_count, versions, parts,
                                          targets.columns, targets.table)

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
                        return _write_part(cur, shard_count, shard_id, versions[shard_id], parts,
                                           targets.columns, targets.table)
                finally:
                    cur.close()

            head = _export_header(con, tmp, target, targets.columns, targets.table)
            # The merge is Python and DuckDB's copy of the shard tables below releases the
            # GIL: the export is written beside it, not after it.
            export = _Background(lambda stop: _write_export(tmp, target, head, part_files,
                                                            hook, stop, rewrite))

            def export_written() -> Path:
                report_progress("publish", step="waiting for the export's merge")
                export.result()
                return tmp
            try:
                report_progress("publish", step=f"table: replacing {table_shards} of "
                                f"{shard_count} shards, while the export is merged from "
                                f"{len(part_files)} parts")
                with transaction(con, after_commit=publish_files):
                    if built_from is not None:
                        built_from(manifest_in(con, SNAPSHOT, shard_count))
                    # The snapshot's tables: the same rows by construction, already sorted.
                    con.execute("SET preserve_insertion_order = true")
                    with per_shard_threads(con, rows_per_shard):
                        replace_shards(con, shard_count, ALIAS, one_per_key, changed, hook,
                                        copy_from=SNAPSHOT, table=targets.table)
                    count = int(con.execute(
                        f"SELECT count(*) FROM {ALIAS}.{targets.table}").fetchone()[0])
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
            detach_quietly(con, SNAPSHOT)
            raise
    finally:
        tmp.unlink(missing_ok=True)
        remove_temp(snapshot_tmp)
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
