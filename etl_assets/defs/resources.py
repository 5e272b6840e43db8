"""The typed resources assets, checks and sensors receive: the configuration itself.

Each resource is one concern's settings class from `lib.settings` (fields, defaults and
descriptions defined there, once) with what Dagster adds: the warehouse (on dagster-duckdb's
DuckDBResource, whose `get_connection()` is the short write), staging and the export, fault
injection (the chaos drill and crash points), and automation (sensor re-runs). The UI's
resource page shows what a run used, and a step hands the library `EtlSettings.of(...)` its
resources. The shard count is not among them: it decides the partitions, so it is fixed when
the definitions are built.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from etl_assets.defs.contracts import LAUNCHED_BY_CLI, LAUNCHED_BY_TAG, PipelineNames, names_for
from etl_assets.lib import limits, warehouse
from etl_assets.lib.settings import (
    CONCERNS,
    AutomationSettings,
    EtlSettings,
    FaultSettings,
    StagingSettings,
    WarehouseSettings,
    set_in_environment,
)


class WarehouseResource(DuckDBResource, WarehouseSettings):
    """The DuckDB warehouse file. Heavy work runs in private in-memory connections; the file is
    attached only for each short write, waiting at most `lock_timeout_s` for another writer."""

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The short-write connection, under the name every Dagster engineer calls: an
        in-memory DuckDB connection with the warehouse attached (and made the default database)
        for the `with` block only, after waiting at most `lock_timeout_s` for another writer.

        DuckDBResource's own would open the file read-write for the whole asset body, holding
        its lock against every other run; keep the block short. `connection_config` is applied
        as DuckDB settings on the connection.
        """
        limits_ = limits.DuckDBLimits(self.memory_limit, self.threads)
        with warehouse.scratch(limits_) as con:
            for name, value in sorted(self.connection_config.items()):
                if not name.isidentifier():
                    raise ValueError(f"connection_config: {name!r} is not a DuckDB setting name")
                con.execute(f"SET {name} = $value", {"value": value})
            # No declaration here (it is the staging resource's): a new warehouse gets the
            # tables every pipeline has, its pipeline's own come with its first write.
            with warehouse.attached(con, self.database, self.lock_timeout_s,
                                    self.ducklake_data_path, None) as alias:
                con.execute(f"USE {alias}")
                try:
                    yield con
                finally:
                    # A transaction left open ends here, as in every short write; the
                    # warehouse can be detached only once it is not the default database.
                    warehouse.rollback_quietly(con)
                    con.execute("USE memory")

    @contextmanager
    def read_only(self) -> Iterator[duckdb.DuckDBPyConnection | None]:
        """The warehouse attached READ_ONLY as `wh` (None before it exists): for decisions."""
        with warehouse.read_only(self.database, self.lock_timeout_s) as con:
            yield con


class StagingResource(dg.ConfigurableResource, StagingSettings):
    """Where the sources are read, staged per shard and exported, and what a source may reject."""


class FaultInjectionResource(dg.ConfigurableResource, FaultSettings):
    """The chaos drill and the crash points; all off by default."""


class AutomationResource(dg.ConfigurableResource, AutomationSettings):
    """What the sensors may launch on their own."""


# Concern -> its resource class: every concern of the settings is exactly one of them. The
# shipped pipeline's resource keys are these names; another's carry its name (names.resource).
RESOURCE_TYPES: dict[str, type[dg.ConfigurableResource]] = {
    "warehouse": WarehouseResource, "staging": StagingResource,
    "faults": FaultInjectionResource, "automation": AutomationResource,
}


def queue_slots(instance: dg.DagsterInstance) -> int:
    """How many runs the instance's run queue lets be in progress at once (below 1: no limit,
    which `limits.threads_per_run` counts as one run per core)."""
    queue = instance.get_concurrency_config().run_queue_config
    return queue.max_concurrent_runs if queue is not None else 0


def for_this_run(
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, settings: EtlSettings
) -> EtlSettings:
    """`settings` with the DuckDB threads this step's run may use.

    DUCKDB_THREADS, when set, wins; `etl-assets run` shares the cores among its own workers
    (runner.worker_threads). Any other run (the UI, a backfill, a sensor, `dagster asset
    materialize`) may run beside as many others as the run queue allows, so its connections
    get cores / max_concurrent_runs threads: together they never ask for more than the cores.
    """
    if settings.threads or context.run.tags.get(LAUNCHED_BY_TAG) == LAUNCHED_BY_CLI:
        return settings
    threads = limits.threads_per_run(limits.cores(), queue_slots(context.instance))
    return settings.replace(threads=threads)


def step_settings(
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, shard_count: int,
    warehouse: WarehouseResource, staging: StagingResource,
    faults: FaultInjectionResource | None = None,
) -> EtlSettings:
    """What a step hands the library: its resources' settings, with its run's DuckDB threads."""
    return for_this_run(context, EtlSettings.of(shard_count, warehouse, staging, faults))


# What an asset step reads: the warehouse, staging and fault injection.
STEP_CONCERNS = ("warehouse", "staging", "faults")


def resource_keys(names: PipelineNames, *concerns: str) -> set[str]:
    """The keys of a pipeline's resources of these concerns (its steps' `required_resource_keys`)."""
    return {names.resource(concern) for concern in concerns}


def resources_of(context: dg.AssetExecutionContext | dg.SensorEvaluationContext
                 | dg.ScheduleEvaluationContext, names: PipelineNames,
                 *concerns: str) -> tuple[Any, ...]:
    """A step's or a tick's resources of these concerns, in order, under its pipeline's keys."""
    return tuple(getattr(context.resources, names.resource(concern)) for concern in concerns)


def resources_for(settings: EtlSettings, named: bool | Mapping[str, str] = False,
                  ) -> dict[str, dg.ConfigurableResource]:
    """Every resource of the pipeline `settings` run, under its keys (`names.resource`), holding
    the values of `settings`. With `named` (True: every variable the environment sets; or a
    mapping field -> variable), a value an environment variable set is configured as that
    variable (`dg.EnvVar`, so the UI's resource page names it) where Dagster can read one: text
    and whole numbers. A fraction or a switch is given as the value `settings` parsed from it."""
    var_of = set_in_environment() if named is True else dict(named or {})
    names = names_for(settings)
    out = {}
    for key, cls in RESOURCE_TYPES.items():
        config = settings.part(next(c for c in cls.__mro__ if c in CONCERNS))
        for name, var in var_of.items():
            kind = cls.model_fields[name].annotation if name in config else None
            if kind is str:
                config[name] = dg.EnvVar(var)
            elif kind is int:
                config[name] = dg.EnvVar.int(var)
        out[names.resource(key)] = cls(**config)
    return out
