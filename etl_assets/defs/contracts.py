"""The names other code relies on, defined once: asset keys, job names, tags, metadata keys,
the shard partitions, the shard event lines in a run's log, and the non-retryable failure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg

from etl_assets.lib import pipeline
from etl_assets.lib.events import format_event
from etl_assets.lib.settings import EtlSettings


@dataclass(frozen=True)
class PipelineNames:
    """A pipeline's asset keys, job, group, sensor and resource names. The shipped pipeline's
    are the plain names (`crm`, `shard_profiles`, `customer_profiles`, `sources_job`,
    `warehouse`); another's carry its name: keys under its prefix (`fleet/vehicles`,
    `fleet/profiles`), the others as `fleet_<name>`, so two pipelines share one Dagster
    instance, or one code location, without sharing a name."""

    prefix: tuple[str, ...]
    source_names: tuple[str, ...]
    profiles_table: str = "customer_profiles"

    def key(self, name: str) -> dg.AssetKey:
        return dg.AssetKey([*self.prefix, name])

    def name(self, name: str) -> str:
        """A job, group, sensor, schedule or resource key of this pipeline."""
        return "_".join([*self.prefix, name])

    def resource(self, concern: str) -> str:
        """The key of this pipeline's resource of one concern (`warehouse` when shipped,
        `fleet_warehouse` for fleet): two pipelines in one code location each keep their own."""
        return self.name(concern)

    @property
    def sources(self) -> dict[str, dg.AssetKey]:
        return {name: self.key(name) for name in self.source_names}

    @property
    def shard_inputs(self) -> dg.AssetKey:
        return self.key("shard_inputs")

    @property
    def shard_profiles(self) -> dg.AssetKey:
        return self.key("shard_profiles")

    @property
    def profiles(self) -> dg.AssetKey:
        """The merged asset, named after its table: `customer_profiles` when shipped,
        `<name>/profiles` otherwise."""
        return self.key(self.profiles_table)

    @property
    def sources_job(self) -> str:
        return self.name("sources_job")

    @property
    def shards_job(self) -> str:
        return self.name("shards_job")

    @property
    def profiles_job(self) -> str:
        return self.name("profiles_job")


def names_for(settings: EtlSettings) -> PipelineNames:
    """The names of the pipeline `settings` run."""
    return PipelineNames(tuple(pipeline.key_prefix(settings.pipeline)),
                         tuple(s.name for s in settings.declaration.sources),
                         settings.profiles_table)


# The shipped pipeline's names, which tools and tests rely on.
SHIPPED = PipelineNames((), tuple(s.name for s in pipeline.declaration("").sources))
SOURCE_KEYS: dict[str, dg.AssetKey] = SHIPPED.sources
SHARD_INPUTS = SHIPPED.shard_inputs
SHARD_PROFILES = SHIPPED.shard_profiles
CUSTOMER_PROFILES = SHIPPED.profiles

SOURCES_JOB = SHIPPED.sources_job
SHARDS_JOB = SHIPPED.shards_job
PROFILES_JOB = SHIPPED.profiles_job

PARTITION_TAG = "dagster/partition"
DATA_VERSION_TAG = "dagster/data_version"
# Dagster's own tags on the runs a backfill, a sensor or a schedule launched, and on a
# re-execution (the run it repeats).
BACKFILL_TAG = "dagster/backfill"
SENSOR_NAME_TAG = "dagster/sensor_name"
SCHEDULE_NAME_TAG = "dagster/schedule_name"
PARENT_RUN_TAG = "dagster/parent_run_id"
# Why a sensor or the schedule requested a run, and what it saw.
TRIGGER_TAG = "etl/trigger"
CHANGED_SHARDS_TAG = "etl/changed_shards"
RERUN_ATTEMPT_TAG = "etl/rerun_attempt"
RERUN_OF_TAG = "etl/rerun_of"

# Who launched a run, on every run (the UI filters on it): `etl-assets run` tags its own runs,
# the sensors and the schedule their requests, and the instance's run coordinator
# (tools/instance.py) every other run it receives, from what Dagster's own tags say.
LAUNCHED_BY_TAG = "etl/launched_by"
LAUNCHED_BY_CLI = "cli"
# `etl-assets run --submit`: runs handed to a deployment's run queue, executed by its workers.
LAUNCHED_BY_SUBMIT = "cli:submit"
LAUNCHED_BY_BACKFILL = "backfill"
# A run submitted with none of Dagster's origin tags: the UI's launch buttons (or another client
# of the webserver's API, such as `dagster job launch`).
LAUNCHED_BY_UI = "ui"


def launched_by_sensor(name: str) -> str:
    """The LAUNCHED_BY_TAG value of a run that sensor `name` requested."""
    return f"sensor:{name}"


def launched_by_schedule(name: str) -> str:
    """The LAUNCHED_BY_TAG value of a run that schedule `name` requested."""
    return f"schedule:{name}"


def launched_by(tags: Mapping[str, str]) -> str:
    """Who launched a run with these tags: its own LAUNCHED_BY_TAG if it has one, else what
    Dagster's tags say (a backfill, a sensor, a schedule), else the UI.

    A re-execution (it has a parent run) copies its parent's tags, LAUNCHED_BY_TAG among them;
    that one says who launched the parent, so it is not taken.
    """
    if tags.get(LAUNCHED_BY_TAG) and not tags.get(PARENT_RUN_TAG):
        return tags[LAUNCHED_BY_TAG]
    if tags.get(BACKFILL_TAG):
        return LAUNCHED_BY_BACKFILL
    if tags.get(SENSOR_NAME_TAG):
        return launched_by_sensor(tags[SENSOR_NAME_TAG])
    if tags.get(SCHEDULE_NAME_TAG):
        return launched_by_schedule(tags[SCHEDULE_NAME_TAG])
    return LAUNCHED_BY_UI


ROW_COUNT = "dagster/row_count"
COLUMN_SCHEMA = "dagster/column_schema"
# On a failure's metadata: False when waiting and retrying cannot help (failed_shard_sensor).
RETRYABLE = "retryable"


def shard_partitions(shard_count: int) -> dg.StaticPartitionsDefinition:
    """One partition per shard, keyed "0".."N-1"."""
    return dg.StaticPartitionsDefinition([str(k) for k in range(shard_count)])


def shard_event(context: dg.AssetExecutionContext, event: str, **fields: Any) -> str:
    """Log one shard event as a single JSON line (sorted keys) to the run's log; return the line.

    shard_skip ends an attempt that found nothing to do (the shard is already current).
    """
    line = format_event({"event": event, **fields})
    if event == "shard_error":
        context.log.error(line)
    else:
        context.log.info(line)
    return line


def not_retryable(exc: BaseException) -> dg.Failure:
    """The failure for a problem that waiting cannot fix (missing input, bad path, full disk):
    Dagster does not retry it, and failed_shard_sensor reads `retryable` and leaves it."""
    return dg.Failure(description=str(exc), allow_retries=False, metadata={RETRYABLE: False})
