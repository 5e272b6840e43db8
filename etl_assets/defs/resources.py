"""The typed resources assets, checks and sensors receive, and the settings built from them.

Four resources, each with the settings of one concern, so the UI's resource page shows what a
run used: the warehouse (built on dagster-duckdb's DuckDBResource), staging and the export,
fault injection (the chaos drill and crash points), and automation (sensor re-runs). The shard
count is not among them: it decides the partitions, so it is fixed when the definitions are
built. `pipeline_settings` turns the resources back into the one `EtlSettings` the library
reads; `resources_for` does the reverse, and `resources_from_env` names the environment
variable behind each value that one sets.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource
from pydantic import Field

from etl_assets.defs.contracts import LAUNCHED_BY_CLI, LAUNCHED_BY_TAG
from etl_assets.lib import limits, warehouse
from etl_assets.lib.settings import EtlSettings, set_in_environment


class WarehouseResource(DuckDBResource):
    """The DuckDB warehouse file. Heavy work runs in private in-memory connections; the file is
    attached only for each short write, waiting at most `lock_timeout_s` for another writer."""

    lock_timeout_s: float = Field(default=60.0, description="Longest wait for the file lock (s).")
    memory_limit: str = Field(default=limits.DEFAULT_MEMORY_LIMIT,
                              description="Per DuckDB connection, then spill.")
    threads: int = Field(default=0, description="DuckDB threads per connection (0: per core).")
    ducklake_data_path: str = Field(
        default="", description="With a ducklake: database, the shared folder of its data.")

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
            with warehouse.attached(con, self.database, self.lock_timeout_s,
                                    self.ducklake_data_path) as alias:
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


class StagingResource(dg.ConfigurableResource):
    """Where the sources are read, staged per shard and exported, and what a source may reject."""

    data_dir: str = Field(description="The folder holding crm.csv, billing.csv, ...")
    home_dir: str = Field(description="The run's home: the spill folder and the run lock.")
    staging_dir: str = Field(description="Per-source, per-shard staged versions.")
    export_path: str = Field(description="merged_output.csv, replaced atomically.")
    max_reject_fraction: float = Field(default=0.01, description="Above it a source fails.")
    force: bool = Field(default=False, description="Recompute even what is unchanged.")


class FaultInjectionResource(dg.ConfigurableResource):
    """The chaos drill and the crash points; all off by default."""

    chaos_fail_shard: int | None = Field(default=None, description="Shard that fails.")
    chaos_fail_mode: str = Field(default="once", description="once or always.")
    crash_at: str = Field(default="", description="A named write point to crash at.")
    crash_mode: str = Field(default="kill", description="kill, enospc or stop.")


class AutomationResource(dg.ConfigurableResource):
    """What the sensors may launch on their own."""

    automation: str = Field(default="on", description="on or off: sensors start running.")
    sensor_interval_s: int = Field(default=30, description="Seconds between sensor ticks.")
    rerun_max_attempts: int = Field(default=2, description="Re-runs of a failed shard.")
    rerun_base_wait_s: float = Field(default=30.0, description="First wait before a re-run.")


# Fixed when the definitions are built (partitions, the retry policy): not run-time config.
DEFINITION_TIME = ("shard_count", "shard_retry_delay_s")

# Resource key -> (class, {resource field: settings field}). The one map between the two shapes.
RESOURCES: dict[str, tuple[type[dg.ConfigurableResource], dict[str, str]]] = {
    "warehouse": (WarehouseResource, {
        "database": "duckdb_path", "lock_timeout_s": "lock_timeout_s",
        "memory_limit": "duckdb_memory_limit", "threads": "duckdb_threads",
        "ducklake_data_path": "ducklake_data_path"}),
    "staging": (StagingResource, {
        "data_dir": "data_dir", "home_dir": "home_dir", "staging_dir": "staging_dir",
        "export_path": "export_path", "max_reject_fraction": "max_reject_fraction",
        "force": "force"}),
    "faults": (FaultInjectionResource, {
        "chaos_fail_shard": "chaos_fail_shard", "chaos_fail_mode": "chaos_fail_mode",
        "crash_at": "crash_at", "crash_mode": "crash_mode"}),
    "automation": (AutomationResource, {
        "automation": "automation", "sensor_interval_s": "sensor_interval_s",
        "rerun_max_attempts": "rerun_max_attempts", "rerun_base_wait_s": "rerun_base_wait_s"}),
}


def pipeline_settings(
    shard_count: int, warehouse: WarehouseResource, staging: StagingResource,
    faults: FaultInjectionResource | None = None,
    automation: AutomationResource | None = None,
) -> EtlSettings:
    """The library's settings from the resources a step received. The warehouse and staging
    resources are always needed (together they fix every path); without faults or automation,
    their defaults (no fault injected) apply."""
    values: dict[str, Any] = {"shard_count": shard_count}
    for key, resource in (("warehouse", warehouse), ("staging", staging), ("faults", faults),
                          ("automation", automation)):
        if resource is not None:
            values.update({field: getattr(resource, name)
                           for name, field in RESOURCES[key][1].items()})
    return EtlSettings.from_env(env={}, **values)


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
    if settings.duckdb_threads or context.run.tags.get(LAUNCHED_BY_TAG) == LAUNCHED_BY_CLI:
        return settings
    threads = limits.threads_per_run(limits.cores(), queue_slots(context.instance))
    return settings.replace(duckdb_threads=threads)


def step_settings(
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, shard_count: int,
    warehouse: WarehouseResource, staging: StagingResource,
    faults: FaultInjectionResource | None = None,
) -> EtlSettings:
    """What a step hands the library: its resources' settings, with its run's DuckDB threads."""
    return for_this_run(context, pipeline_settings(shard_count, warehouse, staging, faults))


def resources_for(settings: EtlSettings) -> dict[str, dg.ConfigurableResource]:
    """Every resource, holding the values of `settings`."""
    return {key: cls(**{name: getattr(settings, field) for name, field in fields.items()})
            for key, (cls, fields) in RESOURCES.items()}


def resources_from_env(settings: EtlSettings) -> dict[str, dg.ConfigurableResource]:
    """Like `resources_for`, but a value that came from an environment variable is configured
    as that variable (`dg.EnvVar`), so the UI's resource page names it."""
    var_of = set_in_environment()
    out = {}
    for key, (cls, fields) in RESOURCES.items():
        config: dict[str, Any] = {}
        for name, field in fields.items():
            var, kind = var_of.get(field), cls.model_fields[name].annotation
            # Text and whole numbers can be read from the variable at run time; other kinds
            # (a fraction, a switch) are given as the value the settings parsed from it.
            if var is not None and kind in (str, "str"):
                config[name] = dg.EnvVar(var)
            elif var is not None and kind in (int, "int"):
                config[name] = dg.EnvVar.int(var)
            else:
                config[name] = getattr(settings, field)
        out[key] = cls(**config)
    return out
