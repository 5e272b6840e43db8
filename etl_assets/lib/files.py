"""File primitives, in one place: temp names beside a target and their clean-up, durable
writes that hash what they write, the one sha256 of a file, and link-or-copy.

A file other processes read is written under a temp name in its own folder
(`.<name>.<pid>.tmp`, so the final rename is atomic on one filesystem), fsynced, then renamed
into place; a temp file whose process is gone is removed by the next writer. A temp folder
(`temp_dir`) is locked by its writer for its whole life, so that it is removed only once that
writer is gone, on whichever machine shares the folder (`remove_dead_temp_dirs`).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from etl_assets.lib import errors
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


TEMP_DIR_PREFIX = ".tmp-"
_LOCK_SUFFIX = ".lock"
# A temp folder without a lock file was made by older code, or is a version moved aside (which
# no one writes): removed once it has not changed for this long.
UNLOCKED_TEMP_DIR_AGE_S = 60
# flock reports a lock held elsewhere as EWOULDBLOCK (EAGAIN), some filesystems as EACCES.
_HELD_ELSEWHERE = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
# The lock files this process holds, by (st_dev, st_ino). Its own prune never opens them: on
# NFS flock is a POSIX lock, which a second descriptor of the same process would take too,
# and whose closing would release the holder's.
_held: set[tuple[int, int]] = set()
_held_guard = threading.Lock()


@contextmanager
def temp_dir(parent: Path) -> Iterator[Path]:
    """A fresh private folder `<parent>/.tmp-<uuid>` to write into, for as long as the block
    runs; at its end it is removed, unless it was renamed away (published) before.

    Its writer holds an exclusive flock on `.tmp-<uuid>.lock` beside it from before the folder
    exists until after it is gone, so `remove_dead_temp_dirs` leaves it alone however long it
    lives, from any process on any machine sharing the folder (NFS clients take flock as the
    server's byte-range locks, which it frees when the client dies). Not the filelock package:
    it creates the file it locks and keeps it, while a pruner must lock an existing file
    without creating one, and unlink it.
    """
    parent.mkdir(parents=True, exist_ok=True)
    fd, lock = _new_lock(parent)
    path = _folder_of(lock)
    try:
        path.mkdir()
        yield path
    finally:
        try:
            shutil.rmtree(path, ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            with _held_guard:
                _held.discard(_file_id(os.fstat(fd)))
            os.close(fd)  # releases the lock


def remove_dead_temp_dirs(parent: Path) -> None:
    """Remove the temp folders (`temp_dir`) in `parent` whose writer is certainly gone: the
    lock of its lock file is free (taken here without waiting, and held while removing). A
    `.tmp-*` folder without a lock file only once unchanged for UNLOCKED_TEMP_DIR_AGE_S."""
    for lock in parent.glob(f"{TEMP_DIR_PREFIX}*{_LOCK_SUFFIX}"):
        try:
            fd = _open_unless_ours(lock)
        except OSError:
            continue  # gone meanwhile, or not ours to open: nothing is certain
        if fd is None:
            continue
        try:
            if _try_lock(fd) and _is_file(lock, fd):
                shutil.rmtree(_folder_of(lock), ignore_errors=True)
                lock.unlink(missing_ok=True)
        except OSError:
            pass  # a filesystem without locks: the writer may be alive
        finally:
            os.close(fd)
    for path in parent.glob(f"{TEMP_DIR_PREFIX}*"):
        if path.is_dir() and not path.with_name(path.name + _LOCK_SUFFIX).exists() \
                and age_s(path) > UNLOCKED_TEMP_DIR_AGE_S:
            shutil.rmtree(path, ignore_errors=True)


def _new_lock(parent: Path) -> tuple[int, Path]:
    """A new lock file in `parent`, created and locked by this process: (descriptor, path)."""
    while True:
        lock = parent / f"{TEMP_DIR_PREFIX}{uuid.uuid4().hex}{_LOCK_SUFFIX}"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            locked = _try_lock(fd)
        except OSError as exc:
            os.close(fd)
            lock.unlink(missing_ok=True)
            # Without locks a live writer cannot be told from a dead one.
            raise errors.PathError(parent, "file locks (flock) are not supported: "
                                   f"{errors.os_problem(exc)}") from exc
        # A pruner may take a new file's lock before its creator does, and unlinks it: then
        # try another name.
        if locked and _is_file(lock, fd):
            with _held_guard:
                _held.add(_file_id(os.fstat(fd)))
            return fd, lock
        os.close(fd)


def _open_unless_ours(lock: Path) -> int | None:
    """`lock` opened for locking (flock over NFS needs it writable), or None if this process
    holds it."""
    with _held_guard:
        if _file_id(lock.stat()) in _held:
            return None
    return os.open(lock, os.O_RDWR)


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on `fd` without waiting; False if another holder has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _HELD_ELSEWHERE:
            return False
        raise
    return True


def _is_file(path: Path, fd: int) -> bool:
    """`path` still names the file open as `fd` (it was not unlinked, nor replaced)."""
    try:
        return _file_id(path.stat()) == _file_id(os.fstat(fd))
    except FileNotFoundError:
        return False


def _folder_of(lock: Path) -> Path:
    return lock.with_name(lock.name.removesuffix(_LOCK_SUFFIX))


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def age_s(path: Path) -> float:
    """Seconds since `path` last changed (0 when it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


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
    with open(tmp, "wb") as out:
        records, sha = fill(out)
        out.flush()
        os.fsync(out.fileno())
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
    with open(source, "rb") as fin, open(target, "wb") as fout:
        before = os.fstat(fin.fileno())
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            digest.update(chunk)
            fout.write(chunk)
            copied += len(chunk)
            if copied == len(chunk):
                hook("source_mid_snapshot")
        fout.flush()
        os.fsync(fout.fileno())
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
