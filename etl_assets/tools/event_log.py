"""Dagster's SQLite event log, with each new run's database copied from a template.

Dagster's `SqliteEventLogStorage` keeps one SQLite file per run and creates it table by table
when the run logs its first event: it loads every Alembic migration script twice (to read the
head revision, then to stamp it) and commits each DDL statement on its own. Measured on the
1,000-customer sample (12 runs): about 0.1 s of CPU and 125 fsyncs a run, a fifth of what the
default command spends in Dagster. This class makes that database once per Dagster version
(with Dagster's own code) and copies it for each new run; everything else is Dagster's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Any

import dagster
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool


class TemplatedSqliteEventLogStorage(SqliteEventLogStorage):
    """`SqliteEventLogStorage` whose new run databases are copies of one made by Dagster."""

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> TemplatedSqliteEventLogStorage:
        # The parent builds a SqliteEventLogStorage by name, not `cls`.
        return cls(inst_data=inst_data, **config_value)

    def template_path(self) -> str:
        """The template of this Dagster version (not `*.db`: Dagster lists those as runs)."""
        return os.path.join(self._base_dir, f".run-template-{dagster.__version__}.sqlite")

    def _template(self) -> str:
        path = self.template_path()
        if not os.path.exists(path):
            # Made aside and renamed into place, so processes starting together each see a
            # whole template (both may make one; the last rename wins, they are the same).
            temp = f"{path}.{uuid.uuid4().hex}.tmp"
            engine = create_engine(f"sqlite:///{temp}", poolclass=NullPool)
            try:
                super()._initdb(engine)
            finally:
                engine.dispose()  # the last connection closed: the WAL is folded into the file
            os.replace(temp, path)
        return path

    def _initdb(self, engine: Engine, for_index_shard: bool = False) -> None:
        path = engine.url.database
        if for_index_shard or not path or os.path.exists(path):
            super()._initdb(engine, for_index_shard)
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
