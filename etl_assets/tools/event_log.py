"""Dagster's SQLite event log, with each new run's database copied from a template.

Dagster's `SqliteEventLogStorage` keeps one SQLite file per run and creates it table by table
when the run logs its first event: it loads every Alembic migration script twice (to read the
head revision, then to stamp it) and commits each DDL statement on its own. Measured on the
1,000-customer sample (12 runs): about 0.1 s of CPU and 125 fsyncs a run, a fifth of what the
default command spends in Dagster. This class makes that database once per Dagster version
(with Dagster's own code) and copies it for each new run.

Dagster also builds a new SQLAlchemy engine for every connection it opens, that is twice for
most events (the run's database, then the index); this class keeps one engine per database,
still without a pool, so each connection is opened and closed exactly as before (closing the
last one folds the WAL into the file, which is what Dagster's file watcher, and so the UI's live
event stream, waits for). Everything else is Dagster's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import dagster
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
)
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DatabaseError
from sqlalchemy.pool import NullPool


class TemplatedSqliteEventLogStorage(SqliteEventLogStorage):
    """`SqliteEventLogStorage` whose new run databases are copies of one made by Dagster."""

    # Engines kept, most recently used last: a webserver reads many runs' databases, and an
    # engine without a pool holds no connection or file, only memory.
    MAX_ENGINES = 64

    def __init__(self, base_dir: str, inst_data: Any = None) -> None:
        self._engines: OrderedDict[str, Engine] = OrderedDict()  # the parent connects already
        super().__init__(base_dir, inst_data)

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> TemplatedSqliteEventLogStorage:
        # The parent builds a SqliteEventLogStorage by name, not `cls`.
        return cls(inst_data=inst_data, **config_value)

    @contextlib.contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        """Dagster's `_connect` (a transaction on a new connection, under the storage's lock),
        with the shard's engine made once."""
        with self._db_lock:
            engine = self._engines.pop(shard, None) or create_engine(
                self.conn_string_for_shard(shard), poolclass=NullPool,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
            self._engines[shard] = engine
            if len(self._engines) > self.MAX_ENGINES:
                self._engines.popitem(last=False)[1].dispose()
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    def template_path(self) -> str:
        """The template of this Dagster version (not `*.db`: Dagster lists those as runs)."""
        return os.path.join(self._base_dir, f".run-template-{dagster.__version__}.sqlite")

    def _template(self) -> str:
        path = self.template_path()
        if path in _checked_templates:
            return path
        if os.path.exists(path) and not _stamped(path, with_events=True):
            # Damaged (cut short, restored in part): remade below rather than copied to every
            # new run, which would then fail on a missing table, run after run.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if not os.path.exists(path):
            # Made aside and renamed into place, so processes starting together each see a
            # whole template (both may make one; the last rename wins, they are the same).
            temp = f"{path}.{uuid.uuid4().hex}.tmp"
            try:
                engine = _file_engine(temp)
                try:
                    super()._initdb(engine)
                finally:
                    engine.dispose()  # the last connection closed: the WAL is in the file
                os.replace(temp, path)
            finally:
                for leftover in (temp, f"{temp}-wal", f"{temp}-shm", f"{temp}-journal"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
        _checked_templates.add(path)  # once per process: it is not rewritten in place
        return path

    def _initdb(self, engine: Engine, for_index_shard: bool = False) -> None:
        path = engine.url.database
        if for_index_shard or not path:
            super()._initdb(engine, for_index_shard)
            return
        if os.path.exists(path):
            # Stamped: what Dagster's own check concludes too, without loading its migrations.
            if not _stamped(path):
                super()._initdb(engine)
            return
        temp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            shutil.copyfile(self._template(), temp)
            # On disk before it has the run's name: SQLite trusts a file it finds to be whole.
            with open(temp, "rb+") as fh:
                os.fsync(fh.fileno())
            try:
                # A hard link never replaces: if another process created this run's file
                # meanwhile, that file stands and Dagster checks it as usual.
                os.link(temp, path)
            except OSError:
                # Taken meanwhile, or a file system without hard links: Dagster's own way.
                super()._initdb(engine, for_index_shard)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


# The templates this process has found whole (or made).
_checked_templates: set[str] = set()


def _file_engine(path: str) -> Engine:
    return create_engine(f"sqlite:///{path}", poolclass=NullPool)


def _stamped(path: str, with_events: bool = False) -> bool:
    """Whether the database at `path` has an Alembic revision (and, `with_events`, the events
    table).

    Dagster's `_initdb` leaves such a database as it is (it creates and stamps only one
    without), but loads every migration script to read the head revision first, about 0.1 s in
    a new process and 10 ms after. Reading a run's events from another process (the CLI, the
    webserver) checks each run's database.
    """
    engine = _file_engine(path)
    try:
        with engine.connect() as conn:
            row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
            if with_events:
                conn.exec_driver_sql("SELECT 1 FROM event_logs LIMIT 0")
    except DatabaseError:  # no such table, not a database: not made whole by Dagster (yet)
        return False
    finally:
        engine.dispose()
    return bool(row and row[0])
