"""File primitives, in one place: temp names beside a target and their clean-up, durable
writes that hash what they write, the one sha256 of a file, and link-or-copy.

A file other processes read is written under a temp name in its own folder
(`.<name>.<pid>.tmp`, so the final rename is atomic on one filesystem), fsynced, then renamed
into place; a temp file whose process is gone is removed by the next writer.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from etl_assets.lib import errors, uncached
from etl_assets.lib.faults import Hook, no_hook


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


def temp_path(target: Path) -> Path:
    """This process's temp file for `target`: `.<name>.<pid>.tmp` in the same folder, so the
    final rename stays on one filesystem (atomic)."""
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def stale_temps(target: Path) -> Iterator[Path]:
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


def remove_temp(tmp: Path) -> None:
    """Remove a temp file and the WAL DuckDB may have left beside it."""
    tmp.unlink(missing_ok=True)
    tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)


def stale_temps_in(folder: Path) -> Iterator[Path]:
    """`.<name>.<pid>.tmp` files in `folder` left by processes that no longer exist."""
    for tmp in folder.glob(".*.tmp"):
        pid = tmp.name[:-len(".tmp")].rpartition(".")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            yield tmp


class HashingWriter:
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


def write_durably(tmp: Path, fill: Callable[[BinaryIO], tuple[int, str]]) -> tuple[str, int]:
    """`fill(out)` writes `tmp` over, returning its record count and the sha256 of what it
    wrote (taken as it is written); then it is fsynced (on disk before the manifest that names
    its hash commits; a full disk can also show up only here, when delayed writes are flushed).
    Its sha256 and the count."""
    # Written around the page cache (uncached): nothing in this run reads the export again.
    with uncached.UncachedWriter(tmp) as out:
        records, sha = fill(out)  # type: ignore[arg-type]
        out.finish()
    return sha, records


class SourceChangedError(RuntimeError):
    """The file changed while it was being read; a later attempt may find it complete."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        super().__init__(f"{self.path}: changed while being read (size or modification time "
                         "moved during the copy); run again once it is complete")


def snapshot_file(source: str | Path, target: str | Path, hook: Hook = no_hook) -> str:
    """Copy `source` to `target` and return the sha256 of exactly the bytes copied.

    The pipeline reads the copy, never the file a user or a sync tool may still be writing, so
    what is hashed is what is staged. Bytes that moved during the copy (the file was truncated,
    appended to or rewritten: its size or mtime changed on the open handle) raise
    `SourceChangedError`. A file replaced by rename meanwhile is not a change here: the open
    handle keeps reading one whole, real version.
    """
    digest = hashlib.sha256()
    copied = 0
    # The copy is written around the page cache: an edit is staged from a few of its records
    # and the copy kept for the next edit's diff, which reads it that way too (uncached).
    with open(source, "rb") as fin, uncached.UncachedWriter(target) as fout:
        before = os.fstat(fin.fileno())
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            digest.update(chunk)
            fout.write(chunk)
            copied += len(chunk)
            if copied == len(chunk):
                hook("source_mid_snapshot")
        fout.finish()
        after = os.fstat(fin.fileno())
    if copied != after.st_size or \
            (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise SourceChangedError(source)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of the file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def link_or_copy(source: Path, target: Path) -> None:
    """`target` as a hard link of `source` (staged files are never changed in place once
    written), or a copy where the filesystem has no hard links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
