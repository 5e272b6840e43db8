"""`etl-assets run --submit`: hand the pipeline's runs to a deployment's run queue.

The same runs, decisions and summary as `runner.run_pipeline` (sources that changed, then one
run per shard that is not current, then customer_profiles with its checks), but each run is
submitted through the deployment's webserver (DAGSTER_WEBSERVER_URL), with Dagster's GraphQL
client, as the UI's Materialize button does: the webserver creates it in the deployment's
instance and puts it in its queue, the daemon launches it, and its executor runs the steps (on
Celery workers when the deployment sets CELERY_BROKER_URL). This command only follows the runs
to their end and reads the outcome back from the instance (PostgreSQL, DAGSTER_PG_URL).

The runs carry this command's paths (warehouse, staging, export) as run config, so they work
on exactly what this command checked for freshness; those paths must be shared storage that
reads the same on every worker.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import dagster as dg

from etl_assets.defs.contracts import (
    LAUNCHED_BY_SUBMIT,
    LAUNCHED_BY_TAG,
    PARTITION_TAG,
    names_for,
)
from etl_assets.defs.resources import resources_for
from etl_assets.lib.events import format_event
from etl_assets.lib.settings import EtlSettings, SettingsError, pg_url
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

if TYPE_CHECKING:
    from dagster_graphql import DagsterGraphQLClient

WEBSERVER_VAR = "DAGSTER_WEBSERVER_URL"
POLL_S = 0.5


class NoDeployment(RuntimeError):
    """--submit without a Postgres-backed Dagster instance to submit to."""


# A worker's memory and cores are its own: its environment decides them, not this command's.
MACHINE_FIELDS = ("memory_limit", "threads")


def submit_config(settings: EtlSettings) -> dict[str, Any]:
    """The run config every submitted run carries: this command's warehouse and staging paths,
    and the faults it was asked to inject (the chaos drill); otherwise the deployment's own
    fault settings (none, normally) stand."""
    resources, names = resources_for(settings), names_for(settings)
    concerns = ["warehouse", "staging"]
    if settings.chaos_fail_shard is not None or settings.crash_at:
        concerns.append("faults")
    keys = [names.resource(concern) for concern in concerns]
    return {"resources": {key: {"config": _config_of(resources[key])} for key in keys}}


def _config_of(resource: dg.ConfigurableResource) -> dict[str, Any]:
    return {k: v for k, v in resource.model_dump().items()
            if v is not None and k not in MACHINE_FIELDS}


def webserver_url(env: Mapping[str, str] | None = None) -> str:
    """DAGSTER_WEBSERVER_URL, checked: SettingsError naming the variable (never its value)."""
    url = (os.environ if env is None else env).get(WEBSERVER_VAR, "").strip()
    if not url:
        raise SettingsError(f"--submit hands the runs to the deployment's webserver: set "
                            f"{WEBSERVER_VAR} to its address (http://host:3000)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
            or parts.username or parts.password or parts.query or parts.fragment:
        raise SettingsError(f"{WEBSERVER_VAR} must be the webserver's http:// or https:// "
                            "address (http://host:3000, optionally with a path prefix)")
    return url


def graphql_client(url: str) -> DagsterGraphQLClient:
    """Dagster's GraphQL client for the webserver at `url` (checked by `webserver_url`)."""
    # Imported here: `etl-assets run` without --submit does not pay for it.
    from dagster_graphql import DagsterGraphQLClient

    parts = urlsplit(url)
    return DagsterGraphQLClient(parts.hostname or "", port_number=parts.port,
                                use_https=parts.scheme == "https",
                                path_prefix=parts.path.rstrip("/"), timeout=60)


def submit_run(
    client: DagsterGraphQLClient, job_name: str, run_config: dict[str, Any],
    tags: dict[str, str], asset_selection: Iterable[dg.AssetKey] | None = None,
) -> str:
    """Submit a run of `job_name` to the deployment's run queue; its id."""
    return client.submit_job_execution(
        job_name, run_config=run_config, tags=tags,
        asset_selection=list(asset_selection) if asset_selection is not None else None)


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
    """Submit the runs `run_pipeline` would execute here to the deployment's run queue, in the
    same order, and follow them to their end; the same outcome, read from the event log."""
    if pg_url() is None:
        raise NoDeployment("--submit needs a deployment to submit to: set DAGSTER_PG_URL to its "
                           "Dagster instance (PostgreSQL)")
    client = graphql_client(webserver_url())
    outcome = RunOutcome(export_path=settings.export_path, snapshot_path=settings.snapshot_path)
    tags = {INVOCATION_TAG: uuid.uuid4().hex, LAUNCHED_BY_TAG: LAUNCHED_BY_SUBMIT}
    run_config = submit_config(settings)

    def run_and_wait(job: str, **kwargs: Any) -> dg.DagsterRun:
        run_id = submit_run(client, job, run_config, tags, **kwargs)
        outcome.run_ids.append(run_id)
        return next(wait_for(instance, [run_id], interrupted))

    names = names_for(settings)
    changed = sources_to_stage(settings, echo)
    if changed or not shard_inputs_recorded(settings, instance):
        run = run_and_wait(names.sources_job, asset_selection=[names.key(n) for n in changed]
                           + [names.shard_inputs])
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
    shard_of = {submit_run(client, names.shards_job, run_config, {**tags, PARTITION_TAG: str(k)}): k
                for k in todo}
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
    run = run_and_wait(names.profiles_job)
    checks = check_results(instance, run.run_id, False)
    outcome.checks.extend((name, passed, metadata) for name, passed, metadata, _ in checks)
    failed_checks = [name for name, passed, _, _ in checks if not passed]
    if failed_checks:
        outcome.reason = f"check(s) failed: {', '.join(failed_checks)}"
    else:
        outcome.reason = run_error(instance, run)
    return outcome
