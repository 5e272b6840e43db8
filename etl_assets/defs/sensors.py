"""Sensors and the schedule: new or changed source data rebuilds exactly what changed.

- `source_files_sensor` watches the four CSVs by content hash. A file must read the same on two
  consecutive ticks before it counts (no run on a half-written file). One changed shard: one run
  of the changed sources, that shard and customer_profiles. Several: a run of the changed
  sources; the shards then show as stale and are requested one run each on the next ticks, and
  customer_profiles follows through its AutomationCondition once none is in progress.
- `failed_shard_sensor` re-requests a shard partition whose run failed after its own retries, a
  bounded number of times with a growing wait, never for errors marked not retryable.
- `stale_partitions_schedule` (off by default) requests whatever is stale or missing daily.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import dagster as dg

from etl_assets.defs.contracts import (
    CHANGED_SHARDS_TAG,
    CUSTOMER_PROFILES as PROFILES,
    LAUNCHED_BY_TAG,
    PARTITION_TAG,
    RERUN_ATTEMPT_TAG,
    RERUN_OF_TAG,
    RETRYABLE,
    SHARD_INPUTS,
    SHARD_PROFILES as SHARDS,
    SHARDS_JOB,
    SOURCE_KEYS,
    TRIGGER_TAG,
    launched_by_schedule,
    launched_by_sensor,
)
from etl_assets.defs.resources import (
    AutomationResource,
    StagingResource,
    WarehouseResource,
    pipeline_settings,
)
from etl_assets.lib import staging
from etl_assets.lib.profiles import stale_shards
from etl_assets.lib.schema import SOURCES
from etl_assets.lib.settings import EtlSettings
from etl_assets.lib.sources import plan_slices
from etl_assets.lib.validation import SourceFileError, file_sha256
from etl_assets.lib.warehouse import WarehouseLockedError


@dataclass
class Evaluation:
    """What one sensor tick decided."""

    run_requests: list[dg.RunRequest] = field(default_factory=list)
    skip_reason: Optional[str] = None
    cursor: dict[str, Any] = field(default_factory=dict)


def _staged_or_none(settings: EtlSettings, name: str) -> Optional[staging.StagedSource]:
    try:
        staged = staging.read_pointer(settings.staging_dir, name)
    except staging.StagingError:
        return None
    return staged if staged.shard_count == settings.shard_count else None


ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
          dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def evaluate_source_files(
    settings: EtlSettings, cursor: dict[str, Any], instance: Optional[dg.DagsterInstance] = None
) -> Evaluation:
    """Decide one tick of `source_files_sensor` from the files, the staged data and the cursor."""
    pending: dict[str, str] = dict(cursor.get("pending", {}))
    requested: dict[str, str] = dict(cursor.get("requested", {}))
    data_dir = Path(settings.data_dir)
    missing = [s.filename for s in SOURCES.values() if not (data_dir / s.filename).is_file()]
    if missing:
        return Evaluation(
            skip_reason=f"{', '.join(missing)} missing in {data_dir}: no run until it is back",
            cursor={"pending": {}, "requested": requested},
        )

    changed: dict[str, str] = {}
    settling: list[str] = []
    for name, schema in SOURCES.items():
        sha = file_sha256(data_dir / schema.filename)
        staged = _staged_or_none(settings, name)
        if (staged is not None and sha == staged.file_sha256) or sha == requested.get(name):
            pending.pop(name, None)
        elif pending.get(name) == sha:
            changed[name] = sha  # the same content on two consecutive ticks: settled
        else:
            pending[name] = sha
            settling.append(schema.filename)
    for name in changed:
        pending.pop(name, None)
    new_cursor = {"pending": pending, "requested": {**requested, **changed}}

    if changed:
        return Evaluation(_requests_for_changes(settings, changed), cursor=new_cursor)
    if settling:
        return Evaluation(
            skip_reason=f"waiting for {', '.join(settling)} to settle (content changed since "
            "the last tick)",
            cursor=new_cursor,
        )
    if instance is not None and instance.get_runs_count(dg.RunsFilter(statuses=ACTIVE)):
        # Mid-run, staged sources can be ahead of their shards: judge staleness afterwards.
        return Evaluation(skip_reason="runs in progress; shards are checked when they finish",
                          cursor=new_cursor)
    return _requests_for_stale_shards(settings, new_cursor)


def _staging_selection(changed: dict[str, str]) -> list[dg.AssetKey]:
    """The changed sources, then shard_inputs, so the UI knows which shard partitions changed."""
    return [*(SOURCE_KEYS[name] for name in sorted(changed)), SHARD_INPUTS]


def _requests_for_changes(settings: EtlSettings, changed: dict[str, str]) -> list[dg.RunRequest]:
    shards: set[int] = set()
    for name in changed:
        staged = _staged_or_none(settings, name)
        try:
            _, hashes = plan_slices(SOURCES[name], settings)
        except SourceFileError:
            hashes = {}  # the source run will fail with the clear message; no shard to plan
        shards |= {
            k for k in settings.shard_ids
            if staged is None or hashes.get(k, staged.slice_hashes[k]) != staged.slice_hashes[k]
        }
    content = "+".join(f"{name}@{sha[:16]}" for name, sha in sorted(changed.items()))
    sources = _staging_selection(changed)
    if len(shards) == 1:
        (k,) = shards
        return [dg.RunRequest(
            run_key=f"files:{content}:shard{k}",
            asset_selection=[*sources, SHARDS, PROFILES],
            partition_key=str(k),
            tags={TRIGGER_TAG: "source_files", CHANGED_SHARDS_TAG: str(k)},
        )]
    return [dg.RunRequest(
        run_key=f"files:{content}",
        asset_selection=sources,
        tags={TRIGGER_TAG: "source_files",
              CHANGED_SHARDS_TAG: ",".join(map(str, sorted(shards))) or "none"},
    )]


def _requests_for_stale_shards(settings: EtlSettings, cursor: dict[str, Any]) -> Evaluation:
    if any(_staged_or_none(settings, name) is None for name in SOURCES):
        return Evaluation(skip_reason="sources not staged yet", cursor=cursor)
    try:
        stale = stale_shards(settings.replace(lock_timeout_s=2.0))
    except WarehouseLockedError as exc:
        return Evaluation(skip_reason=f"warehouse busy, next tick: {exc}", cursor=cursor)
    if not stale:
        return Evaluation(skip_reason="source files unchanged and every shard current",
                          cursor=cursor)
    staged = staging.current_sources(settings.staging_dir, list(SOURCES), settings.shard_count)
    return Evaluation(
        [dg.RunRequest(
            run_key=f"stale:shard{k}:{staging.shard_input_hash(staged, k)[:16]}",
            asset_selection=[SHARDS],
            partition_key=str(k),
            tags={TRIGGER_TAG: "stale_shard"},
        ) for k in stale],
        cursor=cursor,
    )


def _shard_partition(run: dg.DagsterRun) -> Optional[str]:
    """The shard partition a run built, if it built one (asset selection or the shards job)."""
    targets_shards = SHARDS in (run.asset_selection or set()) or run.job_name == SHARDS_JOB
    return run.tags.get(PARTITION_TAG) if targets_shards else None


def _not_retryable(instance: dg.DagsterInstance, run_id: str) -> bool:
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        data = entry.dagster_event.step_failure_data
        user = data.user_failure_data if data else None
        if user is not None and user.metadata.get(RETRYABLE) is not None:
            if user.metadata[RETRYABLE].value is False:
                return True
    return False


def evaluate_failed_shards(
    settings: EtlSettings, instance: dg.DagsterInstance, now: Optional[float] = None
) -> Evaluation:
    """Re-request shard partitions whose newest run failed, within the bound and the wait."""
    now = time.time() if now is None else now
    records = instance.get_run_records(limit=500)
    newest: dict[str, Any] = {}
    for record in records:  # newest first
        partition = _shard_partition(record.dagster_run)
        if partition is not None and partition not in newest:
            newest[partition] = record
    requests, waiting, exhausted = [], [], []
    for partition, record in sorted(newest.items()):
        run = record.dagster_run
        if run.status != dg.DagsterRunStatus.FAILURE:
            continue
        attempt = int(run.tags.get(RERUN_ATTEMPT_TAG, "0"))
        if attempt >= settings.rerun_max_attempts:
            exhausted.append(partition)
            continue
        if _not_retryable(instance, run.run_id):
            exhausted.append(partition)
            continue
        wait = settings.rerun_base_wait_s * (2 ** attempt)
        ended = record.end_time or record.update_timestamp.timestamp()
        if now - ended < wait:
            waiting.append(f"{partition} in {wait - (now - ended):.0f}s")
            continue
        requests.append(dg.RunRequest(
            run_key=f"rerun:{partition}:{run.run_id}",
            asset_selection=[SHARDS],
            partition_key=partition,
            tags={RERUN_ATTEMPT_TAG: str(attempt + 1), RERUN_OF_TAG: run.run_id,
                  TRIGGER_TAG: "failed_shard"},
        ))
    reason = None
    if not requests:
        parts = []
        if waiting:
            parts.append("rerun of shard " + ", ".join(waiting))
        if exhausted:
            parts.append(f"left failed (bound reached or not retryable): shards {', '.join(exhausted)}")
        reason = "; ".join(parts) or "no failed shard runs"
    return Evaluation(requests, skip_reason=reason)


def tagged(requests: list[dg.RunRequest], origin: str) -> list[dg.RunRequest]:
    """The requests, each tagged with who launched it (LAUNCHED_BY_TAG)."""
    return [r.with_replaced_attrs(tags={**r.tags, LAUNCHED_BY_TAG: origin}) for r in requests]


SOURCE_FILES_SENSOR = "source_files_sensor"
FAILED_SHARD_SENSOR = "failed_shard_sensor"
PROFILES_AUTOMATION = "profiles_automation_sensor"
STALE_SCHEDULE = "stale_partitions_schedule"


def build_sensors(settings: EtlSettings) -> list[Any]:
    """The three sensors (on by default) and the daily schedule (off by default).

    `settings` gives what is fixed when the definitions load (cadence, default status, shard
    count); each tick reads the rest from its resources.
    """
    shard_count = settings.shard_count
    targets = [*SOURCE_KEYS.values(), SHARD_INPUTS, SHARDS, PROFILES]
    # ETL_AUTOMATION=off starts every sensor stopped (each can still be turned on in the UI).
    default = (dg.DefaultSensorStatus.RUNNING if settings.automation == "on"
               else dg.DefaultSensorStatus.STOPPED)

    @dg.sensor(
        name=SOURCE_FILES_SENSOR,
        minimum_interval_seconds=settings.sensor_interval_s,
        default_status=default,
        target=targets,
        description="Rebuilds exactly the shards whose input changed when a CSV's content "
        "changes (content hashes, two ticks to settle).",
    )
    def source_files_sensor(
        context: dg.SensorEvaluationContext, warehouse: WarehouseResource,
        staging: StagingResource,
    ) -> dg.SensorResult:
        result = evaluate_source_files(pipeline_settings(shard_count, warehouse, staging),
                                       json.loads(context.cursor or "{}"), context.instance)
        return dg.SensorResult(
            run_requests=tagged(result.run_requests, launched_by_sensor(SOURCE_FILES_SENSOR)),
            skip_reason=result.skip_reason,
            cursor=json.dumps(result.cursor, sort_keys=True),
        )

    @dg.sensor(
        name=FAILED_SHARD_SENSOR,
        minimum_interval_seconds=settings.sensor_interval_s,
        default_status=default,
        target=[SHARDS],
        description="Re-requests a failed shard partition up to RERUN_MAX_ATTEMPTS times, "
        "waiting RERUN_BASE_WAIT_S x 2^n; not for errors marked not retryable.",
    )
    def failed_shard_sensor(
        context: dg.SensorEvaluationContext, warehouse: WarehouseResource,
        staging: StagingResource, automation: AutomationResource,
    ) -> dg.SensorResult:
        settings = pipeline_settings(shard_count, warehouse, staging, automation=automation)
        result = evaluate_failed_shards(settings, context.instance)
        return dg.SensorResult(
            run_requests=tagged(result.run_requests, launched_by_sensor(FAILED_SHARD_SENSOR)),
            skip_reason=result.skip_reason)

    @dg.schedule(
        name=STALE_SCHEDULE,
        cron_schedule="0 3 * * *",
        target=targets,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Daily: stage changed sources, or rebuild stale/missing shard partitions.",
    )
    def stale_partitions_schedule(
        context: dg.ScheduleEvaluationContext, warehouse: WarehouseResource,
        staging: StagingResource,
    ) -> Any:
        settings = pipeline_settings(shard_count, warehouse, staging)
        changed = {
            name: file_sha256(Path(settings.data_dir) / s.filename)
            for name, s in SOURCES.items()
            if (Path(settings.data_dir) / s.filename).is_file()
        }
        staged = {name: _staged_or_none(settings, name) for name in SOURCES}
        changed = {n: h for n, h in changed.items() if staged[n] is None or staged[n].file_sha256 != h}
        origin = launched_by_schedule(STALE_SCHEDULE)
        if changed:
            return tagged([dg.RunRequest(asset_selection=_staging_selection(changed))],
                               origin)
        result = _requests_for_stale_shards(settings, {})
        return (tagged(result.run_requests, origin)
                or dg.SkipReason(result.skip_reason or "nothing stale"))

    # Declared here (not left to Dagster's implicit default) so that it is on by default,
    # ticks as often as the other sensors, and is visible by name in the UI.
    profiles_automation = dg.AutomationConditionSensorDefinition(
        PROFILES_AUTOMATION,
        target=[PROFILES],
        run_tags={LAUNCHED_BY_TAG: launched_by_sensor(PROFILES_AUTOMATION)},
        default_status=default,
        minimum_interval_seconds=settings.sensor_interval_s,
        description="Evaluates customer_profiles' automation condition: rebuild once its shards "
        "were updated, none is in progress and blocking checks passed.",
    )

    return [source_files_sensor, failed_shard_sensor, profiles_automation,
            stale_partitions_schedule]
