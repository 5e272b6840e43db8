"""`etl-assets run --submit`: hand the pipeline's runs to a deployment's run queue.

The same runs, decisions and summary as `runner.run_pipeline` (sources that changed, then one
run per shard that is not current, then customer_profiles with its checks), but each run is
created in the deployment's Dagster instance (PostgreSQL, DAGSTER_PG_URL) and submitted to its
queue: the deployment's daemon launches it, and its executor runs the steps (on Celery workers
when the deployment sets CELERY_BROKER_URL). This command only follows the runs to their end
and reads the outcome back from the instance's event log.

The runs carry this command's paths (warehouse, staging, export) as run config, so they work
on exactly what this command checked for freshness; those paths must be shared storage that
reads the same on every worker.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
from dagster._core.definitions.selector import JobSubsetSelector
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.remote_representation.code_location import CodeLocation
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

from etl_assets.defs.contracts import (
    LAUNCHED_BY_SUBMIT,
    LAUNCHED_BY_TAG,
    PARTITION_TAG,
    PROFILES_JOB,
    SHARD_INPUTS,
    SHARDS_JOB,
    SOURCES_JOB,
)
from etl_assets.defs.resources import resources_for
from etl_assets.lib.events import format_event
from etl_assets.lib.settings import EtlSettings
from etl_assets.tools.instance import pg_url
from etl_assets.tools.outcome import (
    RunOutcome,
    ShardRow,
    failure_of,
    metadata_values,
    shard_events,
    shard_failure_reason,
    shard_row,
)
from etl_assets.tools.runner import (
    INVOCATION_TAG,
    shard_inputs_recorded,
    shards_to_run,
    sources_to_stage,
)

# The code location's name in workspace.yaml: the deployment's daemon finds a run's code by it.
LOCATION = "etl_assets"
MODULE = "etl_assets.definitions"
POLL_S = 0.5


class NoDeployment(RuntimeError):
    """--submit without a Postgres-backed Dagster instance to submit to."""


# A worker's memory and cores are its own: its environment decides them, not this command's.
MACHINE_FIELDS = ("memory_limit", "threads")


def submit_config(settings: EtlSettings) -> dict[str, Any]:
    """The run config every submitted run carries: this command's warehouse and staging paths,
    and the faults it was asked to inject (the chaos drill); otherwise the deployment's own
    fault settings (none, normally) stand."""
    resources = resources_for(settings)
    keys = ["warehouse", "staging"]
    if settings.chaos_fail_shard is not None or settings.crash_at:
        keys.append("faults")
    return {"resources": {key: {"config": _config_of(resources[key])} for key in keys}}


def _config_of(resource: dg.ConfigurableResource) -> dict[str, Any]:
    return {k: v for k, v in resource.model_dump().items()
            if v is not None and k not in MACHINE_FIELDS}


@contextmanager
def code_location(instance: dg.DagsterInstance) -> Iterator[CodeLocation]:
    """The code location loaded here, under the name the deployment's workspace gives it."""
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(executable_path=sys.executable, module_name=MODULE),
        location_name=LOCATION)
    with origin.create_location(instance) as location:
        yield location


def submit_run(
    instance: dg.DagsterInstance, location: CodeLocation, job_name: str,
    run_config: dict[str, Any], tags: dict[str, str],
    asset_selection: Iterable[dg.AssetKey] | None = None,
) -> str:
    """Create a run of `job_name` in the instance and put it in the run queue; its id."""
    (repo,) = location.get_repositories().values()
    selector = JobSubsetSelector(location_name=location.name, repository_name=repo.name,
                                 job_name=job_name, op_selection=None,
                                 asset_selection=asset_selection)
    job = location.get_job(selector)
    plan = location.get_execution_plan(job, run_config, step_keys_to_execute=None,
                                       known_state=None, instance=instance)
    run = instance.create_run(
        job_name=job_name, run_id=None, run_config=run_config,
        resolved_op_selection=job.resolved_op_selection,
        step_keys_to_execute=plan.execution_plan_snapshot.step_keys_to_execute,
        op_selection=None, status=None, root_run_id=None, parent_run_id=None,
        tags={**job.tags, **tags}, job_snapshot=job.job_snapshot,
        execution_plan_snapshot=plan.execution_plan_snapshot,
        parent_job_snapshot=job.parent_job_snapshot,
        remote_job_origin=job.get_remote_origin(), job_code_origin=job.get_python_origin(),
        asset_selection=frozenset(asset_selection) if asset_selection else None,
        asset_check_selection=None, asset_graph=repo.asset_graph)
    # The queued run coordinator only records the run as queued; no workspace is needed.
    instance.submit_run(run.run_id, workspace=None)  # type: ignore[arg-type]
    return run.run_id


def wait_for(instance: dg.DagsterInstance, run_ids: list[str],
             interrupted: Callable[[], bool]) -> Iterator[dg.DagsterRun]:
    """Each run once it has finished, in the order they finish."""
    pending = list(run_ids)
    while pending:
        if interrupted():
            raise KeyboardInterrupt
        for run_id in list(pending):
            run = instance.get_run_by_id(run_id)
            if run is not None and run.is_finished:
                pending.remove(run_id)
                yield run
        if pending:
            time.sleep(POLL_S)


def run_error(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str:
    """One line: why a finished run did not succeed ("" if it did)."""
    if run.status == dg.DagsterRunStatus.SUCCESS:
        return ""
    events = [e.dagster_event for e in instance.all_logs(run.run_id) if e.dagster_event]
    reason = failure_of(events)
    if reason == "run failed":
        failure = next((e for e in reversed(events) if e.event_type_value == "RUN_FAILURE"), None)
        message = failure.message if failure is not None else ""
        reason = f"run {run.status.value.lower()}" + (f": {message}" if message else "")
    return reason


def check_results(instance: dg.DagsterInstance, run_id: str,
                  qualified: bool) -> list[tuple[str, bool, dict[str, Any], str]]:
    """(name, passed, metadata, description) of each asset check the run evaluated."""
    out = []
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = entry.dagster_event.event_specific_data
        name = evaluation.check_name
        if qualified:
            name = f"{evaluation.asset_key.to_user_string()}.{name}"
        out.append((name, evaluation.passed, metadata_values(evaluation),
                    evaluation.description or ""))
    return out


def _never() -> bool:
    return False


def submit_pipeline(
    settings: EtlSettings, instance: dg.DagsterInstance,
    echo: Callable[[str], None] = print, interrupted: Callable[[], bool] = _never,
) -> RunOutcome:
    """Submit the runs `run_pipeline` would execute here to the instance's run queue, in the
    same order, and follow them to their end; the same outcome, read from the event log."""
    if pg_url() is None:
        raise NoDeployment("--submit needs a deployment to submit to: set DAGSTER_PG_URL to its "
                           "Dagster instance (PostgreSQL)")
    outcome = RunOutcome(export_path=settings.export_path, snapshot_path=settings.snapshot_path)
    tags = {INVOCATION_TAG: uuid.uuid4().hex, LAUNCHED_BY_TAG: LAUNCHED_BY_SUBMIT}
    run_config = submit_config(settings)
    with code_location(instance) as location:

        def run_and_wait(job: str, **kwargs: Any) -> dg.DagsterRun:
            run_id = submit_run(instance, location, job, run_config, tags, **kwargs)
            outcome.run_ids.append(run_id)
            return next(wait_for(instance, [run_id], interrupted))

        changed = sources_to_stage(settings, echo)
        if changed or not shard_inputs_recorded(settings, instance):
            run = run_and_wait(SOURCES_JOB, asset_selection=[dg.AssetKey(n) for n in changed]
                               + [SHARD_INPUTS])
            for name, passed, metadata, description in check_results(instance, run.run_id, True):
                outcome.checks.append((name, passed, metadata))
                if not passed and not outcome.reason:
                    outcome.reason = description or f"check {name} failed"
            outcome.reason = outcome.reason or run_error(instance, run)
            if outcome.reason:
                return outcome

        outcome.phase = "shards"
        todo, rows = shards_to_run(settings, echo)
        # All at once: the deployment's queue decides how many run together, and where.
        shard_of = {submit_run(instance, location, SHARDS_JOB, run_config,
                               {**tags, PARTITION_TAG: str(k)}): k for k in todo}
        outcome.run_ids.extend(shard_of)
        for run in wait_for(instance, list(shard_of), interrupted):
            events = shard_events(instance, run.run_id)
            for event in events:
                echo(format_event(event))
            error = run_error(instance, run)
            row: ShardRow = shard_row(shard_of[run.run_id], events, not error, error)
            row.run_id = run.run_id
            rows[row.shard_id] = row
        outcome.shards = [rows[k] for k in settings.shard_ids]
        outcome.reason = shard_failure_reason(outcome.shards)
        if outcome.reason:
            return outcome

        outcome.phase = "customer_profiles"
        run = run_and_wait(PROFILES_JOB)
        checks = check_results(instance, run.run_id, False)
        outcome.checks.extend((name, passed, metadata) for name, passed, metadata, _ in checks)
        failed_checks = [name for name, passed, _, _ in checks if not passed]
        if failed_checks:
            outcome.reason = f"check(s) failed: {', '.join(failed_checks)}"
        else:
            outcome.reason = run_error(instance, run)
    return outcome
