"""The DuckLake backend of the warehouse: what differs from a DuckDB file, in one place.

`DUCKDB_PATH=ducklake:postgres:<libpq connection string>` keeps the catalog in PostgreSQL and
the table data as Parquet under `DUCKLAKE_DATA_PATH`, so writers on several machines share one
warehouse. Here: recognising and checking such a path, loading the two extensions offline from
their pip packages, the ATTACH statement, and the one retry policy for commit conflicts between
concurrent writers (DuckLake takes no lock; two writers of one table meet at COMMIT instead).
See docs/ducklake-notes.md.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import duckdb

from etl_assets.lib import secrets

PREFIX = "ducklake:"
POSTGRES_PREFIX = "ducklake:postgres:"
_NO_CATALOG = "creating a new DuckLake is explicitly disabled"
_CONFLICT = "Failed to commit DuckLake transaction"

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_ducklake(path: str) -> bool:
    """True if a DUCKDB_PATH names a DuckLake catalog rather than a DuckDB file."""
    return path.startswith(PREFIX)


def problem(path: str, data_path: str) -> str | None:
    """Why a ducklake DUCKDB_PATH (with its DUCKLAKE_DATA_PATH) cannot be used, or None.

    The password must not be in the path: DuckDB repeats the whole connection string in its
    errors, and the path is shown in logs and the UI. libpq reads PGPASSWORD or ~/.pgpass.
    """
    if not path.startswith(POSTGRES_PREFIX):
        return (f"DUCKDB_PATH: a DuckLake catalog must be {POSTGRES_PREFIX}<libpq connection "
                f"string>, got {redact(path)!r}")
    conninfo = path[len(POSTGRES_PREFIX):].strip()
    if not conninfo:
        return "DUCKDB_PATH: the DuckLake catalog has no connection string after ducklake:postgres:"
    if "://" in conninfo:
        return ("DUCKDB_PATH: write the DuckLake catalog's connection string in libpq's "
                "key=value form (dbname=... host=... port=... user=...), not as a URL")
    if secrets.redact(conninfo) != conninfo:
        return ("DUCKDB_PATH must not hold the password (it would show in logs and errors): "
                "set PGPASSWORD or use ~/.pgpass")
    if not data_path:
        return "DUCKLAKE_DATA_PATH must be set (a folder every writer shares) with a ducklake DUCKDB_PATH"
    return None


def redact(text: str) -> str:
    """`text` with any password (libpq's password=, a URL's user:password@) replaced by ***
    (the CLI's output also masks every password the environment holds)."""
    return secrets.redact(text)


def _extension_file(package: str, name: str) -> str:
    """The extension a pip package ships, for this exact DuckDB (an extension loads into no
    other version): site-packages/<package>/extensions/v<version>/<name>.duckdb_extension."""
    module = __import__(package)
    return str(Path(module.__file__).parent / "extensions" / f"v{duckdb.__version__}"
               / f"{name}.duckdb_extension")


def load_extensions(con: duckdb.DuckDBPyConnection) -> None:
    """Load postgres_scanner and ducklake by path from their pip packages.

    Both are needed before ATTACH (ducklake reaches the catalog through postgres_scanner), and
    neither can be downloaded here: autoinstall is off so a missing one fails at once.
    """
    con.execute("SET autoinstall_known_extensions = false")
    for package, name in (("duckdb_extension_postgres_scanner", "postgres_scanner"),
                          ("duckdb_extension_ducklake", "ducklake")):
        path = _extension_file(package, name)
        con.execute(f"LOAD '{path.replace(chr(39), chr(39) * 2)}'")


def attach_sql(path: str, alias: str, data_path: str, read_only: bool) -> str:
    """The ATTACH statement (DuckDB 1.5 binds no parameter there: literals quoted).

    Writers give DATA_PATH every time: it creates the lake on first use and, afterwards,
    DuckLake refuses a value that differs from the one its catalog recorded, so a writer that
    sees the data elsewhere fails instead of writing files no one else reads. Readers may
    leave it empty: the catalog knows it.
    """
    def quoted(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    options = [f"DATA_PATH {quoted(str(Path(data_path)).rstrip('/') + '/')}"] if data_path else []
    options += ["READ_ONLY"] if read_only else []
    return f"ATTACH {quoted(path)} AS {alias}" + (f" ({', '.join(options)})" if options else "")


def is_missing_catalog(exc: BaseException) -> bool:
    """True if a READ_ONLY ATTACH failed because no lake was ever created there."""
    return isinstance(exc, duckdb.Error) and _NO_CATALOG in str(exc)


def is_creation_race(exc: BaseException) -> bool:
    """True if a read-write ATTACH failed because another process was creating the same new
    catalog's tables in Postgres at that moment (its CREATE TABLEs won): attaching again finds
    the catalog made."""
    text = str(exc)
    return isinstance(exc, duckdb.Error) and (
        "violates unique constraint" in text or "already exists" in text)


class ChangedMeanwhile(RuntimeError):
    """Raised by our own code inside a write that finds another writer changed what it was
    judged from (a conflict DuckLake cannot see: it validates writes, not reads)."""


def is_commit_conflict(exc: BaseException) -> bool:
    """True for DuckLake's commit conflict (another writer committed to the same table first)
    or ChangedMeanwhile, and for nothing else: other TransactionExceptions (no transaction
    open, two databases written in one transaction) are not healed by running again."""
    if isinstance(exc, ChangedMeanwhile):
        return True
    return isinstance(exc, duckdb.TransactionException) and _CONFLICT in str(exc)


class CommitConflictError(RuntimeError):
    """Commits kept conflicting with other writers until the retry policy gave up."""


@dataclass(frozen=True)
class ConflictRetry:
    """Bounded, jittered exponential backoff for DuckLake commit conflicts: wait
    `first_wait_s` x 2^n (at most `max_wait_s`), each times uniform(0.5, 1), at most
    `attempts` tries in all. With ten writers of one table, a writer loses at most nine races
    in a row; the defaults leave room for well over that."""

    attempts: int = 20
    first_wait_s: float = 0.05
    max_wait_s: float = 2.0

    def wait_s(self, failures: int) -> float:
        """The pause after the `failures`-th conflict in a row (1-based)."""
        return min(self.first_wait_s * 2 ** (failures - 1), self.max_wait_s) \
            * random.uniform(0.5, 1.0)


RETRY = ConflictRetry()  # the one policy every DuckLake write uses


def retry_conflicts(attempt: Callable[[], T], what: str, policy: ConflictRetry = RETRY) -> T:
    """Run `attempt` (a whole transaction: BEGIN, body, COMMIT) until it commits.

    A commit conflict re-runs it after a backoff wait, logged as one JSON line (event
    `warehouse_retry`); after `policy.attempts` conflicts, CommitConflictError says so in one
    line. Every other error passes through at once. On a DuckDB file nothing conflicts, so
    this runs `attempt` once.
    """
    for failures in range(1, policy.attempts + 1):
        try:
            return attempt()
        except (duckdb.TransactionException, ChangedMeanwhile) as exc:
            if not is_commit_conflict(exc):
                raise
            if failures == policy.attempts:
                raise CommitConflictError(
                    f"DuckLake warehouse: {what} lost {failures} commits in a row to other "
                    "writers of the same table; gave up (run it again)") from exc
            wait = policy.wait_s(failures)
            log.warning(json.dumps({"event": "warehouse_retry", "what": what,
                                    "attempt": failures + 1, "wait_s": round(wait, 3)}))
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
