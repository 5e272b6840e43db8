"""Sensors and the schedule: new or changed source data rebuilds exactly what changed.

- `source_files_sensor` watches the four CSVs by content hash. A file must read the same on two
  consecutive ticks before it counts (no run on a half-written file). One changed shard: one run
  of the changed sources, that shard and customer_profiles. Several: a run of the changed
  sources; the shards then show as stale and are requested one run each on the next ticks, and
  customer_profiles follows through its AutomationCondition once none is in progress.
- `failed_shard_sensor` re-requests a shard partition whose run failed after its own retries, a
  bounded number of times with a growing wait, never for errors marked not retryable.
- `stale_partitions_schedule` (off by default) requests whatever is stale or missing daily.

Whether a source changed or a shard is stale is never decided here: both ask `freshness`, the
runner's rule (file sha256, layout, staging code, warehouse manifests), without the run
overrides. What is the sensor's own is its cadence: two ticks to settle, one request per content.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from etl_assets.defs.contracts import (
    CHANGED_SHARDS_TAG,
    LAUNCHED_BY_TAG,
    PARTITION_TAG,
    RERUN_ATTEMPT_TAG,
    RERUN_OF_TAG,
    RETRYABLE,
    TRIGGER_TAG,
    PipelineNames,
    launched_by_schedule,
    launched_by_sensor,
    names_for,
)
from etl_assets.defs.resources import resource_keys, resources_of
from etl_assets.lib import freshness, staging
from etl_assets.lib.files import file_sha256
from etl_assets.lib.settings import EtlSettings
from etl_assets.lib.sources import plan_slices
from etl_assets.lib.validation import SourceFileError
from etl_assets.lib.warehouse import WarehouseLockedError


@dataclass
class Evaluation:
    """What one sensor tick decided."""

    run_requests: list[dg.RunRequest] = field(default_factory=list)
    skip_reason: str | None = None
    cursor: dict[str, Any] = field(default_factory=dict)


def _watching(settings: EtlSettings) -> EtlSettings:
    """What the sensors and the schedule judge freshness with: the data as it is (--force and the
    chaos shard are instructions to a run), waiting at most 2 s for a busy warehouse."""
    return freshness.without_overrides(settings).replace(lock_timeout_s=2.0)


def _busy(exc: WarehouseLockedError) -> str:
    return f"warehouse busy, next tick: {exc}"


ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
          dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def evaluate_source_files(
    settings: EtlSettings, cursor: dict[str, Any], instance: dg.DagsterInstance | None = None
) -> Evaluation:
    """Decide one tick of `source_files_sensor` from the files, the staged data and the cursor."""
    pending: dict[str, str] = dict(cursor.get("pending", {}))
    requested: dict[str, str] = dict(cursor.get("requested", {}))
    data_dir = Path(settings.data_dir)
    sources = {s.name: s for s in settings.declaration.sources}
    missing = [s.filename for s in sources.values() if not (data_dir / s.filename).is_file()]
    if missing:
        return Evaluation(
            skip_reason=f"{', '.join(missing)} missing in {data_dir}: no run until it is back",
            cursor={"pending": {}, "requested": requested},
        )

    settings = _watching(settings)
    changed: dict[str, str] = {}
    settling: list[str] = []
    states: dict[str, freshness.SourceState] = {}
    for name, schema in sources.items():
        sha = file_sha256(data_dir / schema.filename)
        try:
            # Changed since it was staged? The same rule as the runner's (freshness).
            states[name] = state = freshness.source_state(schema, settings, sha)
        except WarehouseLockedError as exc:
            return Evaluation(skip_reason=_busy(exc), cursor={
                "pending": dict(cursor.get("pending", {})), "requested": requested})
        # The cadence is the sensor's own: a change counts once the file reads the same on two
        # consecutive ticks, and the same content is requested only once.
        if state.unchanged or sha == requested.get(name):
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
        return Evaluation(_requests_for_changes(settings, changed, states), cursor=new_cursor)
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


def _staging_selection(names: PipelineNames, changed: Iterable[str]) -> list[dg.AssetKey]:
    """The changed sources, then shard_inputs, so the UI knows which shard partitions changed."""
    return [*(names.key(name) for name in sorted(changed)), names.shard_inputs]


def _requests_for_changes(
    settings: EtlSettings, changed: dict[str, str], states: dict[str, freshness.SourceState]
) -> list[dg.RunRequest]:
    shards: set[int] = set()
    names = names_for(settings)
    sources_by_name = {s.name: s for s in settings.declaration.sources}
    for name in changed:
        # The shards whose slice of this source the file as it is now would change.
        staged = states[name].staged
        try:
            _, hashes = plan_slices(sources_by_name[name], settings)
        except SourceFileError:
            hashes = {}  # the source run will fail with the clear message; no shard to plan
        shards |= {
            k for k in settings.shard_ids
            if staged is None or hashes.get(k, staged.slice_hashes[k]) != staged.slice_hashes[k]
        }
    content = "+".join(f"{name}@{sha[:16]}" for name, sha in sorted(changed.items()))
    sources = _staging_selection(names, changed)
    if len(shards) == 1:
        (k,) = shards
        return [dg.RunRequest(
            run_key=f"files:{content}:shard{k}",
            asset_selection=[*sources, names.shard_profiles, names.profiles],
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
    """One run per shard that freshness finds not current (`settings`: from `_watching`)."""
    try:
        states = freshness.shard_states(settings)
    except staging.StagingError:
        return Evaluation(skip_reason="sources not staged yet", cursor=cursor)
    except WarehouseLockedError as exc:
        return Evaluation(skip_reason=_busy(exc), cursor=cursor)
    stale = [state for state in states.values() if not state.current]
    if not stale:
        return Evaluation(skip_reason="source files unchanged and every shard current",
                          cursor=cursor)
    return Evaluation(
        [dg.RunRequest(
            run_key=f"stale:shard{state.shard_id}:{state.input_hash[:16]}",
            asset_selection=[names_for(settings).shard_profiles],
            partition_key=str(state.shard_id),
            tags={TRIGGER_TAG: "stale_shard"},
        ) for state in stale],
        cursor=cursor,
    )


def evaluate_schedule(settings: EtlSettings) -> list[dg.RunRequest] | dg.SkipReason:
    """One tick of `stale_partitions_schedule`: stage the sources freshness finds changed (the
    runner's rule), else one run per stale shard. A missing file is not requested (the file
    sensor's tick names it)."""
    settings = _watching(settings)
    data_dir = Path(settings.data_dir)
    try:
        changed = [schema.name for schema in settings.declaration.sources
                   if (data_dir / schema.filename).is_file()
                   and not freshness.source_state(schema, settings).unchanged]
    except WarehouseLockedError as exc:
        return dg.SkipReason(_busy(exc))
    if changed:
        return [dg.RunRequest(asset_selection=_staging_selection(names_for(settings), changed))]
    result = _requests_for_stale_shards(settings, {})
    return result.run_requests or dg.SkipReason(result.skip_reason or "nothing stale")


def _shard_partition(names: PipelineNames, run: dg.DagsterRun) -> str | None:
    """The shard partition a run built, if it built one (asset selection or the shards job)."""
    targets_shards = names.shard_profiles in (run.asset_selection or set()) \
        or run.job_name == names.shards_job
    return run.tags.get(PARTITION_TAG) if targets_shards else None


def _not_retryable(instance: dg.DagsterInstance, run_id: str) -> bool:
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        data = entry.dagster_event.step_failure_data
        user = data.user_failure_data if data else None
        flag = user.metadata.get(RETRYABLE) if user is not None else None
        if flag is not None and flag.value is False:
            return True
    return False


def evaluate_failed_shards(
    settings: EtlSettings, instance: dg.DagsterInstance, now: float | None = None
) -> Evaluation:
    """Re-request shard partitions whose newest run failed, within the bound and the wait."""
    now = time.time() if now is None else now
    records = instance.get_run_records(limit=500)
    names = names_for(settings)
    newest: dict[str, Any] = {}
    for record in records:  # newest first
        partition = _shard_partition(names, record.dagster_run)
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
            asset_selection=[names.shard_profiles],
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
    shard_count, names = settings.shard_count, names_for(settings)
    targets = [*names.sources.values(), names.shard_inputs, names.shard_profiles, names.profiles]
    source_files_name, failed_shard_name = (names.name(SOURCE_FILES_SENSOR),
                                            names.name(FAILED_SHARD_SENSOR))
    schedule_name, automation_name = names.name(STALE_SCHEDULE), names.name(PROFILES_AUTOMATION)
    # ETL_AUTOMATION=off starts every sensor stopped (each can still be turned on in the UI).
    default = (dg.DefaultSensorStatus.RUNNING if settings.automation == "on"
               else dg.DefaultSensorStatus.STOPPED)

    @dg.sensor(
        name=source_files_name,
        minimum_interval_seconds=settings.sensor_interval_s,
        default_status=default,
        target=targets,
        description="Rebuilds exactly the shards whose input changed when a CSV's content "
        "changes (content hashes, two ticks to settle).",
        required_resource_keys=resource_keys(names, "warehouse", "staging"),
    )
    def source_files_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        own = resources_of(context, names, "warehouse", "staging")
        result = evaluate_source_files(EtlSettings.of(shard_count, *own),
                                       json.loads(context.cursor or "{}"), context.instance)
        return dg.SensorResult(
            run_requests=tagged(result.run_requests, launched_by_sensor(source_files_name)),
            skip_reason=result.skip_reason,
            cursor=json.dumps(result.cursor, sort_keys=True),
        )

    @dg.sensor(
        name=failed_shard_name,
        minimum_interval_seconds=settings.sensor_interval_s,
        default_status=default,
        target=[names.shard_profiles],
        description="Re-requests a failed shard partition up to RERUN_MAX_ATTEMPTS times, "
        "waiting RERUN_BASE_WAIT_S x 2^n; not for errors marked not retryable.",
        required_resource_keys=resource_keys(names, "warehouse", "staging", "automation"),
    )
    def failed_shard_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        settings = EtlSettings.of(
            shard_count, *resources_of(context, names, "warehouse", "staging", "automation"))
        result = evaluate_failed_shards(settings, context.instance)
        return dg.SensorResult(
            run_requests=tagged(result.run_requests, launched_by_sensor(failed_shard_name)),
            skip_reason=result.skip_reason)

    @dg.schedule(
        name=schedule_name,
        cron_schedule="0 3 * * *",
        target=targets,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Daily: stage changed sources, or rebuild stale/missing shard partitions.",
        required_resource_keys=resource_keys(names, "warehouse", "staging"),
    )
    def stale_partitions_schedule(context: dg.ScheduleEvaluationContext) -> Any:
        result = evaluate_schedule(EtlSettings.of(
            shard_count, *resources_of(context, names, "warehouse", "staging")))
        if isinstance(result, dg.SkipReason):
            return result
        return tagged(result, launched_by_schedule(schedule_name))

    # Declared here (not left to Dagster's implicit default) so that it is on by default,
    # ticks as often as the other sensors, and is visible by name in the UI.
    profiles_automation = dg.AutomationConditionSensorDefinition(
        automation_name,
        target=[names.profiles],
        run_tags={LAUNCHED_BY_TAG: launched_by_sensor(automation_name)},
        default_status=default,
        minimum_interval_seconds=settings.sensor_interval_s,
        description=f"Evaluates {names.profiles.to_user_string()}' automation condition: "
        "rebuild once its shards were updated, none is in progress and blocking checks passed.",
    )

    return [source_files_sensor, failed_shard_sensor, profiles_automation,
            stale_partitions_schedule]
