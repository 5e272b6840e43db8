"""Which Dagster executor runs the steps of a launched run: in the run's own process, or on
Celery workers.

Without CELERY_BROKER_URL, every step of a run executes in the run's own process, one after
another (what `make ui`, `dagster dev` and `dagster asset materialize` do), as `etl-assets run`
executes its runs. Dagster's default would start a Python process per step, each importing
Dagster and this code location again (docs/performance.md#dagster-and-the-process). What it
would run side by side, the four sources, are each a DuckDB query using every core already,
and each shard is a run of its own. With it (a `redis://` or `amqp://` URL), dagster-celery
sends each step to the broker, and whichever Celery worker (`etl-assets worker`, on this
machine or another) takes it runs it: the shards of a backfill then spread over the workers.

Celery reads the same variable by itself, so the workers and the runs that feed them agree on
the broker without being told twice. The settings below are the one definition both use.
"""

from __future__ import annotations

import functools
from typing import Any

import dagster as dg

QUEUE = "dagster"  # dagster-celery's task routes send every step here

# What a worker that dies in the middle of a step does to that step. acks_late: the broker
# hands the step's message back unless a worker finished it; reject_on_worker_lost: a worker
# whose step process was killed (SIGKILL, out of memory) gives it back at once, and another
# worker runs the step again from the start. That is safe because every write of a step
# commits in one transaction (a shard is old or new, never half). prefetch 1: a worker holds
# only the step it runs, so a queued step never waits behind a long one on a busy worker.
# visibility_timeout: a step whose whole worker vanished (machine lost) is handed out again
# after this long; it must exceed the longest step, or a slow step would run twice at once.
VISIBILITY_TIMEOUT_S = 3600
CELERY_CONFIG: dict[str, Any] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_S},
    "result_backend_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_S},
    "broker_connection_retry_on_startup": True,
}


def result_backend(broker: str) -> str:
    """Where step results go back to the run: the same Redis, or RabbitMQ's reply queues."""
    return broker if broker.startswith(("redis://", "rediss://")) else "rpc://"


def app_args(broker: str) -> dict[str, Any]:
    """The Celery app's arguments for this broker: the executor's and the workers' alike."""
    return {"broker": broker, "backend": result_backend(broker), "config_source": CELERY_CONFIG}


@functools.cache
def executor_for(broker: str | None) -> dg.ExecutorDefinition:
    """dagster-celery's executor configured for `broker`, or without one Dagster's in-process
    executor (step retries and their back-off work the same in it). One object per broker:
    the pipelines of one code location merge only when their executors are the same object."""
    if broker is None:
        return dg.in_process_executor
    from dagster_celery import celery_executor

    args = app_args(broker)
    return celery_executor.configured(
        {"broker": args["broker"], "backend": args["backend"],
         "config_source": args["config_source"]}, name="celery")
