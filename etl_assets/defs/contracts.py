"""The names other code relies on, defined once: asset keys, job names, tags, metadata keys,
the shard partitions, the shard event lines in a run's log, and the non-retryable failure."""

from __future__ import annotations

from typing import Any

import dagster as dg

from etl_assets.lib.events import format_event
from etl_assets.lib.schema import SOURCES

SOURCE_KEYS: dict[str, dg.AssetKey] = {name: dg.AssetKey(name) for name in SOURCES}
SHARD_INPUTS = dg.AssetKey("shard_inputs")
SHARD_PROFILES = dg.AssetKey("shard_profiles")
CUSTOMER_PROFILES = dg.AssetKey("customer_profiles")

SOURCES_JOB = "sources_job"
SHARDS_JOB = "shards_job"
PROFILES_JOB = "profiles_job"

PARTITION_TAG = "dagster/partition"
DATA_VERSION_TAG = "dagster/data_version"
# Where a run came from (the UI filters on it) and what a sensor saw.
TRIGGER_TAG = "etl/trigger"
CHANGED_SHARDS_TAG = "etl/changed_shards"
RERUN_ATTEMPT_TAG = "etl/rerun_attempt"
RERUN_OF_TAG = "etl/rerun_of"

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
