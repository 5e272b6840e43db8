"""`etl-assets worker`: a Celery worker that runs the steps a deployment's runs send it.

Start as many as you like, on this machine or others, each from any folder: a worker needs only
the package, CELERY_BROKER_URL (the broker the runs send steps to), DAGSTER_PG_URL (the
deployment's Dagster instance, where the steps record their events) and the shared paths the
deployment uses (DUCKDB_PATH, STAGING_DIR, EXPORT_PATH, DATA_DIR). It keeps nothing of its own
but a Dagster home (DAGSTER_HOME, default `var/dagster_home` under its folder) whose
`dagster.yaml` points at that same PostgreSQL, and DuckDB's spill folder.
"""

from __future__ import annotations

import os
import socket

from etl_assets.defs.executor import QUEUE, app_args
from etl_assets.lib import limits
from etl_assets.lib.settings import BROKER_VAR, SettingsError, broker_url, set_in_environment


def make_worker_app(broker: str):
    """The Celery app of a worker: dagster-celery's step task, with our settings."""
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_task

    app = make_app(app_args(broker))
    create_task(app)
    return app


def run_worker(name: str, concurrency: int, loglevel: str = "INFO") -> int:
    """Serve steps until stopped (SIGTERM: finish the step in hand, then exit)."""
    broker = broker_url()
    if broker is None:
        raise SettingsError(f"etl-assets worker needs {BROKER_VAR} (the deployment's broker)")
    # A step here has the machine's cores to itself but for the worker's other pool
    # processes: DuckDB threads follow from the worker's concurrency, not from the run
    # queue of the machine that launched the run (DUCKDB_THREADS, when set, wins).
    if "threads" not in set_in_environment():
        os.environ["DUCKDB_THREADS"] = str(max(1, limits.cores() // max(1, concurrency)))
    # Import the code location now, once, so each pool process forked from here starts warm.
    import etl_assets.definitions  # noqa: F401

    app = make_worker_app(broker)
    app.worker_main(["worker", "--queues", QUEUE, "--concurrency", str(concurrency),
                     "--hostname", f"{name}@{socket.gethostname()}", "--loglevel", loglevel,
                     "--pool", "prefork", "--without-gossip", "--without-mingle"])
    return 0
