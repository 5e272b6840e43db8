"""Staged source slices on disk: one Parquet file per shard, published atomically.

Layout: `<staging_dir>/<source>/<version>/shard_id=<k>/*.parquet` plus `<source>/current.json`,
the pointer shards read. A version directory is written under a temporary name and renamed into
place, and the pointer is replaced with os.replace, so a crash never leaves a half-written file
under a name a reader would use. Readers need no DuckDB lock.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from etl_assets.lib import files
from etl_assets.lib.faults import Hook, no_hook
from etl_assets.lib.files import file_sha256
from etl_assets.lib.paths import duckdb_literals
from etl_assets.lib.settings import EtlSettings

log = logging.getLogger(__name__)

POINTER = "current.json"
# A clean version's copy of the file it was staged from, kept (in the current version only) so
# that the next version of an edited file can be staged from the records that changed.
RAW = "source.csv"
KEEP_VERSIONS = 2  # the current one and the previous, for a reader that started just before


class StagingError(RuntimeError):
    """The staged data a shard needs is missing or was staged for another layout."""


class SliceDamagedError(StagingError):
    """A slice on disk is not the file that was staged: its sha256 is not the one recorded
    when it was written (or it was never recorded, or it is missing)."""

    def __init__(self, source: str, path: Path, problem: str) -> None:
        self.source, self.path = source, path
        super().__init__(f"{path}: staged slice of {source!r} {problem}")


@dataclass(frozen=True)
class StagedSource:
    """What a source asset published: the file's identity and its per-shard slices."""

    source: str
    file_sha256: str
    shard_count: int
    version_dir: str
    slice_hashes: dict[int, str]
    slice_rows: dict[int, int]
    # Each slice file's sha256, taken when it was written: "shard_id=<k>/<name>" -> sha256.
    file_sha256s: dict[str, str] = field(default_factory=dict)

    def slice_files(self, shard_id: int) -> list[str]:
        """The shard's Parquet file(s), listed here (not a pattern for DuckDB to expand); there
        is at least one, maybe empty."""
        folder = Path(self.version_dir) / f"shard_id={shard_id}"
        files = sorted(str(p) for p in folder.iterdir() if p.suffix == ".parquet")
        if not files:
            raise StagingError(f"source {self.source!r}: no slice for shard {shard_id} in "
                               f"{self.version_dir}")
        return files

    def slice_sha256s(self, shard_id: int) -> dict[str, str]:
        """The recorded sha256 of each of the shard's slice files, by name in the version."""
        prefix = f"shard_id={shard_id}/"
        return {name: sha for name, sha in self.file_sha256s.items() if name.startswith(prefix)}

    def proven_slice_files(self, shard_id: int) -> list[str]:
        """`slice_files`, each hashed and found to be the file that was staged (the sha256
        recorded when it was written); SliceDamagedError naming the first that is not. For
        a reader about to read them, or a new version about to reuse them."""
        files = self.slice_files(shard_id)
        recorded = self.slice_sha256s(shard_id)
        root = Path(self.version_dir)
        missing = sorted(set(recorded) - {str(Path(f).relative_to(root)) for f in files})
        if missing:
            raise SliceDamagedError(self.source, root / missing[0], "is missing")
        for path in map(Path, files):
            expected = recorded.get(str(path.relative_to(root)))
            if expected is None:
                raise SliceDamagedError(self.source, path, "has no sha256 recorded at staging")
            if file_sha256(path) != expected:
                raise SliceDamagedError(self.source, path, "is not the file staged (its sha256 "
                                        "differs from the one recorded when it was written)")
        return files

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "file_sha256": self.file_sha256,
            "shard_count": self.shard_count,
            "version_dir": self.version_dir,
            "slice_hashes": {str(k): v for k, v in sorted(self.slice_hashes.items())},
            "slice_rows": {str(k): v for k, v in sorted(self.slice_rows.items())},
            "file_sha256s": dict(sorted(self.file_sha256s.items())),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StagedSource:
        return cls(
            source=data["source"],
            file_sha256=data["file_sha256"],
            shard_count=int(data["shard_count"]),
            version_dir=data["version_dir"],
            slice_hashes={int(k): v for k, v in data["slice_hashes"].items()},
            slice_rows={int(k): int(v) for k, v in data["slice_rows"].items()},
            # Absent in a pointer written by older code: nothing it staged is proven.
            file_sha256s=dict(data.get("file_sha256s", {})),
        )


@contextmanager
def temp_dir(staging_dir: str, source: str) -> Iterator[Path]:
    """A fresh private directory in the source's folder (a version before `publish` renames it,
    a snapshot), locked for as long as the block runs, then removed (`files.temp_dir`)."""
    with files.temp_dir(Path(staging_dir) / source) as path:
        yield path


def publish(
    staging_dir: str, tmp_dir: Path | None, staged: StagedSource, hook: Hook = no_hook,
    replace: bool = False,
) -> StagedSource:
    """Rename `tmp_dir` to the version directory, then point `current.json` at it.

    With `tmp_dir` None the version directory already exists (same bytes, published earlier,
    its files proven against `staged.file_sha256s`) and only the pointer moves. Otherwise the
    pointer records the sha256 of every slice file in `tmp_dir`: those `staged.file_sha256s`
    already names (files linked from a version they were proven in) as given, the others
    hashed here as they are made durable. With `replace`, an existing version directory of
    the same name (one that did not hold what its name promises, or --force) is swapped out
    for `tmp_dir`.
    """
    final = Path(staged.version_dir)
    if tmp_dir is not None:
        staged = dataclasses.replace(
            staged, file_sha256s=_fsync_and_hash(tmp_dir, staged.file_sha256s))
        hook("source_before_publish")
        if replace and final.exists():
            # Moved aside first: a rename cannot replace a non-empty directory. A shard that
            # opened the old files keeps reading them; _prune removes the leftover.
            os.rename(final, final.with_name(f"{files.TEMP_DIR_PREFIX}replaced-{uuid.uuid4().hex}"))
        try:
            os.rename(tmp_dir, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
                raise
            # A concurrent run published the same content-addressed version first: the same
            # bytes, layout and code, so theirs is as good as ours (its files, not ours: the
            # pointer records theirs, as that run just wrote them).
            shutil.rmtree(tmp_dir, ignore_errors=True)
            staged = dataclasses.replace(staged, file_sha256s=_fsync_and_hash(final, {}))
    hook("source_before_pointer")
    _write_pointer(Path(staging_dir) / staged.source, staged)
    _prune(Path(staging_dir) / staged.source, keep=final.name)
    return staged


def read_pointer(staging_dir: str, source: str) -> StagedSource:
    """The source's current staged version; StagingError if it was never staged."""
    path = Path(staging_dir) / source / POINTER
    try:
        staged = StagedSource.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise StagingError(
            f"source {source!r} has not been staged yet ({path} missing): materialize the "
            "sources first"
        ) from None
    # The version is the pointer's sibling: found under this reader's staging_dir, whatever
    # path the machine that staged it mounted the shared folder at.
    staged = dataclasses.replace(staged, version_dir=str(path.parent / Path(staged.version_dir).name))
    if not Path(staged.version_dir).is_dir():
        raise StagingError(f"source {source!r}: staged version {staged.version_dir} is gone")
    return staged


def pointer_mtime_ns(staging_dir: str, source: str) -> int:
    """When the source's pointer was last published (OSError if it never was)."""
    return (Path(staging_dir) / source / POINTER).stat().st_mtime_ns


def _write_pointer(source_dir: Path, staged: StagedSource) -> None:
    tmp = source_dir / f".{POINTER}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(staged.to_json(), fh, sort_keys=True, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, source_dir / POINTER)


def _fsync_and_hash(directory: Path, known: dict[str, str]) -> dict[str, str]:
    """Make every slice file under `directory` durable; return each one's sha256 by name in
    the version ("shard_id=<k>/<name>"): from `known` if it names it, else hashed here (just
    written, so read from the page cache)."""
    hashes = {}
    for child in sorted(directory.glob("shard_id=*/*.parquet")):
        name = str(child.relative_to(directory))
        hashes[name] = known.get(name) or file_sha256(child)
        with open(child, "rb") as fh:
            os.fsync(fh.fileno())
    return hashes


def _prune(source_dir: Path, keep: str) -> None:
    """Remove temp leftovers of dead writers and all but the newest versions."""
    # However old, a temp folder whose writer lives (this run's own snapshot, another run's
    # slices) is kept: staging one source can take minutes.
    files.remove_dead_temp_dirs(source_dir)
    # A pointer is written in microseconds: its temp file, once old, was left by a crash.
    for tmp in source_dir.glob(f".{POINTER}.*.tmp"):
        if files.age_s(tmp) > files.UNLOCKED_TEMP_DIR_AGE_S:
            tmp.unlink(missing_ok=True)
    versions = [child for child in source_dir.iterdir() if child.is_dir() and child.name != keep
                and not child.name.startswith(files.TEMP_DIR_PREFIX)]
    versions.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in versions[KEEP_VERSIONS - 1 :]:
        shutil.rmtree(old, ignore_errors=True)
    for old in versions[: KEEP_VERSIONS - 1]:
        (old / RAW).unlink(missing_ok=True)  # only the current version is ever diffed against


def current_sources(settings: EtlSettings) -> dict[str, StagedSource]:
    """Every source's current staged version, in source order; StagingError if one is missing
    or staged for another shard count than `settings.shard_count`."""
    staged = {s.name: read_pointer(settings.staging_dir, s.name)
              for s in settings.declaration.sources}
    for name, source in staged.items():
        if source.shard_count != settings.shard_count:
            raise StagingError(
                f"source {name!r} is staged for {source.shard_count} shards, not "
                f"{settings.shard_count}: materialize the sources again with this SHARD_COUNT"
            )
    return staged


def all_slice_files(staged: dict[str, StagedSource], shard_ids: list[int]) -> list[str]:
    """Every slice file of these shards in every source (source order, then shard order)."""
    return [f for source in staged.values() for k in shard_ids for f in source.slice_files(k)]


def slices_to_read(staged: StagedSource, shard_id: int) -> list[str]:
    """The shard's slice files of one source, proven (`proven_slice_files`), for a reader that
    cannot stage the source again itself (a shard, a check). A damaged slice is removed, so
    that the source's next skip decision finds its slices short and stages it again from its
    file, and StagingError says so in one line naming it."""
    try:
        return staged.proven_slice_files(shard_id)
    except SliceDamagedError as exc:
        exc.path.unlink(missing_ok=True)
        raise StagingError(f"{exc}; removed it: the next `etl-assets run` stages "
                           f"{staged.source!r} again from its file") from None


def shard_input_hash(staged: dict[str, StagedSource], shard_id: int) -> str:
    """The shard's source_data_hash: sha256 over each source's slice hash, in source order."""
    text = "|".join(f"{name}:{staged[name].slice_hashes[shard_id]}" for name in staged)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# A slice hash sums the rows' md5s (as two 64-bit halves): independent of row order, so a
# shuffled file with the same rows gives the same slices, and no sort is needed. The one
# definition, used on the routed rows before staging and on the staged files after it.
SLICE_STATS = """SELECT shard_id, count(*), md5(count(*) || ':'
       || sum(CAST(('0x' || substr(row_hash, 1, 16)) AS UBIGINT)::HUGEINT) || ':'
       || sum(CAST(('0x' || substr(row_hash, 17, 16)) AS UBIGINT)::HUGEINT))
   FROM ({rows}) GROUP BY shard_id"""


def slice_stats_of(
    con: duckdb.DuckDBPyConnection, rows_sql: str, params: dict[str, object], shard_count: int
) -> tuple[dict[int, str], dict[int, int]]:
    stats = con.execute(SLICE_STATS.format(rows=rows_sql), params).fetchall()
    empty = con.execute("SELECT md5('0:NULL:NULL')").fetchone()[0]
    slice_rows = {k: 0 for k in range(shard_count)}
    slice_hashes = {k: empty for k in range(shard_count)}
    for shard_id, rows, digest in stats:
        slice_rows[int(shard_id)] = int(rows)
        slice_hashes[int(shard_id)] = digest
    return slice_hashes, slice_rows


def staged_stats(
    con: duckdb.DuckDBPyConnection, folder: Path, shard_count: int,
    shards: set[int] | None = None,
) -> tuple[dict[int, str], dict[int, int]]:
    """Slice hashes and row counts of a staged version folder (shard_id=<k>/*.parquet), of
    `shards` only if given (the others read as empty)."""
    files = sorted(str(p) for p in folder.glob("shard_id=*/*.parquet")
                   if shards is None or int(p.parent.name.split("=")[1]) in shards)
    if not files:
        return slice_stats_of(con, "SELECT NULL::INTEGER AS shard_id, NULL AS row_hash LIMIT 0", {},
                      shard_count)
    return slice_stats_of(
        con,
        "SELECT shard_id, row_hash FROM read_parquet($files, hive_partitioning = true, "
        "hive_types = {'shard_id': INTEGER})",
        {"files": duckdb_literals(files)},
        shard_count,
    )


def current_version(settings: EtlSettings, source: str) -> StagedSource | None:
    """The source's current staged version, or None if it has none."""
    try:
        return read_pointer(settings.staging_dir, source)
    except StagingError:
        return None


def proven_slices(staged: StagedSource) -> dict[int, list[str]] | None:
    """Every shard's slice files of a version about to be reused (read, or linked into the
    next version), each proven against its recorded sha256; None if one is not, or is gone.
    A slice that is not the file staged is said in one warning line: the caller stages the
    source from its whole file instead."""
    try:
        return {k: staged.proven_slice_files(k) for k in range(staged.shard_count)}
    except SliceDamagedError as exc:
        log.warning(f"{exc}; staging {staged.source} again from its file")
        return None
    except (StagingError, OSError):
        return None


def discard_pass(con: duckdb.DuckDBPyConnection, tmp: Path) -> None:
    """Leave nothing of a streaming pass for the full path: its slices, and the reader's
    refused records (the full path reads the file again and records its own)."""
    shutil.rmtree(tmp, ignore_errors=True)
    con.execute("DROP TABLE IF EXISTS csv_rejects")
    con.execute("DROP TABLE IF EXISTS csv_reject_scans")
