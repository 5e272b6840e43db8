"""One line per failure: OS, DuckDB and SQLite errors turned into `<path>: <problem>`.

Writes happen in Python (open, rename, mkdir), in DuckDB (COPY, COMMIT, CHECKPOINT) and in
Dagster's SQLite storage; each reports a full disk or a bad path differently. The helpers here
give every one of them the same shape, so a user reads what to fix, not which library noticed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NO_SPACE = "no space left on device"

# errno -> the few words a user acts on (the rest fall back to strerror, lowercased).
_PROBLEMS: dict[int, str] = {
    errno.ENOSPC: NO_SPACE,
    errno.EDQUOT: NO_SPACE,  # a quota is a full disk for whoever hits it
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "parent is not a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "not found",
}

# How DuckDB and SQLite word a full disk (they raise their own exception types, without errno).
_NO_SPACE_TEXT = ("no space left on device", "database or disk is full", "disk is full")


class PathError(RuntimeError):
    """A write or read that failed because of its path or its disk; str() is `<path>: <problem>`."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DiskFullError(PathError):
    """No space left where `path` lives. Not retried: the disk must be freed first."""

    def __init__(self, path: str | Path):
        super().__init__(path, NO_SPACE)


class MemoryLimitError(RuntimeError):
    """DuckDB needed more memory than its limit allows (and could not spill the rest): the
    limit is named, with how to raise it, instead of blaming whatever file was being read."""

    def __init__(self, limit: str, detail: str = ""):
        self.limit = limit
        said = f" ({detail})" if detail else ""
        super().__init__(
            f"out of memory: DuckDB needed more than its memory limit per connection "
            f"(DUCKDB_MEMORY_LIMIT={limit or 'unset'}); raise it, e.g. DUCKDB_MEMORY_LIMIT=4GB, "
            f"or unset it for the default{said}")


def is_disk_full(exc: BaseException) -> bool:
    """True if `exc` (or what it wraps) says the disk or a quota is full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFullError):
            return True
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(current).lower() for text in _NO_SPACE_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False


def os_problem(exc: OSError) -> str:
    """The few words for an OSError's errno (`is a directory`, `permission denied`, ...)."""
    if exc.errno in _PROBLEMS:
        return _PROBLEMS[exc.errno]
    return (exc.strerror or type(exc).__name__).lower()


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Re-raise a full disk as DiskFullError(path), and a path OSError as PathError(path).

    Wrap each write with the path a user would free space on or fix; errors that are not about
    the disk or the path pass through unchanged.
    """
    try:
        yield
    except PathError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFullError(path) from exc
        if isinstance(exc, OSError) and exc.errno in _PROBLEMS:
            raise PathError(path, os_problem(exc)) from exc
        raise


def _looks_like_io_error(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno == errno.EIO) or \
        "i/o error" in str(exc).lower()


def filesystem_full(path: str | Path) -> bool:
    """True if the filesystem holding `path` (or its nearest existing folder) is (nearly) full.

    SQLite reports a full disk met while writing its journal as "disk I/O error"; asking the
    filesystem tells the two apart.
    """
    current = Path(path)
    while not current.exists() and current != current.parent:
        current = current.parent
    try:
        stats = os.statvfs(current)
    except OSError:
        return False
    free = stats.f_bavail * stats.f_frsize
    return free < max(1 << 20, stats.f_blocks * stats.f_frsize // 100)


@contextmanager
def disk_full_at(path: str | Path) -> Iterator[None]:
    """Re-raise a full disk as DiskFullError(path); let every other error through unchanged."""
    try:
        yield
    except PathError:
        raise
    except Exception as exc:
        if is_disk_full(exc) or (_looks_like_io_error(exc) and filesystem_full(path)):
            raise DiskFullError(path) from exc
        raise


def one_line(exc: BaseException) -> str:
    """What `etl-assets run` prints after `FAILED: ` for any exception: one line, no traceback."""
    if isinstance(exc, PathError):
        return str(exc)
    if is_disk_full(exc):
        path = getattr(exc, "filename", None)
        return f"{path}: {NO_SPACE}" if path else NO_SPACE
    if isinstance(exc, OSError) and exc.filename:
        problem = os_problem(exc)
        if isinstance(exc, FileExistsError) and Path(exc.filename).exists() \
                and not Path(exc.filename).is_dir():
            problem = "is not a directory"  # mkdir of a path that is a file
        return f"{exc.filename}: {problem}"
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
