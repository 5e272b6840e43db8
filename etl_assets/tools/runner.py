"""Running the whole pipeline through Dagster, recording every run in the instance.

Sources, then one run per shard partition (Dagster's unit of retry and visibility), then
customer_profiles with its checks. The outcome is read back from Dagster's own results and
event log, so what the CLI prints is what the UI shows.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import multiprocessing.util
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

import dagster as dg

from etl_assets.component import build_defs
from etl_assets.defs.contracts import (
    LAUNCHED_BY_CLI,
    LAUNCHED_BY_TAG,
    names_for,
)
from etl_assets.lib import freshness, limits, staging
from etl_assets.lib.events import format_event
from etl_assets.lib.interrupts import Interrupted
from etl_assets.lib.settings import EtlSettings
from etl_assets.tools.outcome import (
    RunOutcome,
    ShardRow,
    first_failure,
    metadata_values,
    shard_events,
    shard_failure_reason,
    shard_row,
)
from etl_assets.tools.progress import Progress

# Dagster's console logger is silenced for the CLI; its events still go to the instance.
QUIET_RUN_CONFIG: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


# The worker's Dagster instance, opened once by `_init_worker` for every shard run it does, as
# the CLI keeps one for all of its runs: each opening reads the storage's config and checks
# its schema, which once per shard was about a tenth of the default command's CPU.
_worker_instance: dg.DagsterInstance | None = None


def _init_worker(parent_pid: int) -> None:
    """Worker initializer: die with the CLI, then open the Dagster instance once.

    A killed CLI must not leave shard writers running on their own. Opening the instance here
    overlaps the sources still staging, instead of delaying the first shard run of each worker.
    """
    global _worker_instance
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    # The signal only covers a parent that dies from now on; one that died meanwhile would
    # leave this worker orphaned.
    if os.getppid() != parent_pid:
        os._exit(1)
    # Forked: the CLI's signal watch (its wakeup fd and handlers) is not this process's. A
    # signal here must not be recorded as one the CLI received.
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Ctrl-C reaches the whole process group: the CLI decides what happens to its workers
    # (it kills them), a worker must not print its own KeyboardInterrupt traceback meanwhile.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_instance = dg.DagsterInstance.get()
    # A pool's worker leaves through os._exit, past atexit: close the instance on the way.
    multiprocessing.util.Finalize(None, _worker_instance.dispose, exitpriority=10)


@functools.lru_cache(maxsize=4)
def _shards_job(values: tuple[tuple[str, Any], ...]) -> dg.JobDefinition:
    """The shard job for these settings, built once per process.

    Every shard of a run uses the same settings; reusing the job object lets Dagster reuse the
    job snapshot it computes when it creates a run, instead of computing it for every shard.
    """
    settings = EtlSettings(**dict(values))
    return build_defs(settings).resolve_job_def(names_for(settings).shards_job)


def _settings_key(settings: EtlSettings, **changes: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted({**settings.field_values(), **changes}.items()))


# Tags every Dagster run of one `etl-assets run`, so an interrupted one can mark the runs its
# killed workers left in progress as canceled (the UI would show them running forever).
INVOCATION_TAG = "etl_assets/invocation"


def _shard_run(
    instance: dg.DagsterInstance, key: tuple[tuple[str, Any], ...], shard_id: int,
    run_config: dict[str, Any], tags: dict[str, str],
) -> tuple[int, str, bool, str]:
    """One shard partition as its own Dagster run."""
    result = _shards_job(key).execute_in_process(
        instance=instance, partition_key=str(shard_id), raise_on_error=False,
        run_config=run_config, tags=tags)
    return shard_id, result.run_id, result.success, "" if result.success else first_failure(result)


def _shard_in_worker(
    key: tuple[tuple[str, Any], ...], shard_id: int, run_config: dict[str, Any],
    tags: dict[str, str],
) -> tuple[int, str, bool, str]:
    """One shard partition as its own Dagster run, in a worker process."""
    assert _worker_instance is not None, "a shard worker starts with `_init_worker`"
    return _shard_run(_worker_instance, key, shard_id, run_config, tags)


def _warm_up() -> None:
    """A no-op task: submitting it makes the pool start its workers now, so that opening their
    Dagster instance overlaps the sources."""


def _start_pool(size: int, fork: bool) -> ProcessPoolExecutor:
    """`size` worker processes for the shards, forked from this process.

    What it buys (1M customers, beside a plain spawned pool): a first run 28.5 -> 23.9 s, 1% of
    billing's rows changed 20.6 -> 17.8 s; docs/performance.md, "What each mechanism buys".

    Forked, not spawned: a spawned worker imports Dagster and the code location again, which
    on 2 cores delays the sources it was meant to overlap. A fork inherits the imports. It is
    safe because nothing a worker uses is shared: it opens its own Dagster instance and DuckDB
    connections; the caller starts the pool before it opens any DuckDB connection (DuckDB's
    threads do not survive a fork), and no other thread of this process writes while it forks
    (progress takes its lock around it). Started later (`fork` False: this process has run
    DuckDB and Dagster steps), it spawns.
    """
    context = multiprocessing.get_context("fork" if fork else "spawn")
    pool = ProcessPoolExecutor(max_workers=size, mp_context=context,
                               initializer=_init_worker, initargs=(os.getpid(),))
    for _ in range(size):
        pool.submit(_warm_up)
    return pool


def worker_threads(settings: EtlSettings, workers: int) -> int:
    """DuckDB threads per shard connection when `workers` shards run at once.

    An explicit DUCKDB_THREADS wins. Otherwise the cores are shared out: a shard's 100k-row merge
    gains little from threads, and P workers each starting one per core oversubscribe the
    machine (docs/performance.md, "Shards and the publish").
    """
    if settings.threads or workers <= 1:
        return settings.threads
    return max(1, limits.cores() // workers)


def _run_shards(
    settings: EtlSettings, shard_ids: list[int], pool: ProcessPoolExecutor | None,
    run_config: dict[str, Any], instance: dg.DagsterInstance, workers: int,
    tags: dict[str, str], interrupted: Callable[[], bool],
) -> Iterator[tuple[int, str, bool, str]]:
    """Run the shards in the worker pool (or here, one after another, without one).

    KeyboardInterrupt as soon as `interrupted()` says so (checked while waiting for workers).
    """
    if pool is None or len(shard_ids) <= 1:
        key = _settings_key(settings)
        for shard_id in shard_ids:
            if interrupted():
                raise KeyboardInterrupt
            yield _shard_run(instance, key, shard_id, run_config, tags)
        return
    key = _settings_key(settings, threads=worker_threads(settings, workers))
    futures = {pool.submit(_shard_in_worker, key, k, run_config, tags): k for k in shard_ids}
    pending = set(futures)
    while pending:
        # Short waits, so a signal is acted on within a fraction of a second.
        done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
        if interrupted():
            raise KeyboardInterrupt
        for future in done:
            try:
                yield future.result()
            except Exception as exc:  # the worker died (killed, out of memory): report it
                yield futures[future], "", False, f"worker process died ({type(exc).__name__})"


class _LazyPool:
    """The shard worker pool, started on first use or ahead of it with `start()`."""

    def __init__(self, workers: int, shard_count: int):
        self.workers, self.shard_count = workers, shard_count
        self.pool: ProcessPoolExecutor | None = None
        # The pids of this process's other children (none today): `kill` leaves them alone.
        self.others: set[int] = set()

    @property
    def size(self) -> int:
        """How many shards run at once."""
        return max(1, min(self.workers, self.shard_count))

    def start(self, early: bool = False) -> ProcessPoolExecutor | None:
        """The pool, started now if it was not; None when shards run one at a time here.

        `early`: before this process opened any DuckDB connection or ran any step, so the
        workers may be forked from it (see `_start_pool`).
        """
        if self.pool is None and self.size > 1:
            self.others = {p.pid for p in multiprocessing.active_children()}
            self.pool = _start_pool(self.size, fork=early)
        return self.pool

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def kill(self) -> None:
        """SIGKILL every worker now (an interrupted run must not wait for shards to finish).

        Safe for the data: a shard commits in one transaction, so a killed worker leaves its
        shard's old rows (test_crash proves it for every write point). The workers are this
        process's children started since the pool was (ProcessPoolExecutor names its own
        processes only from Python 3.14 on).
        """
        if self.pool is None:
            return
        workers = [p for p in multiprocessing.active_children() if p.pid not in self.others]
        for process in workers:
            with contextlib.suppress(OSError, ValueError):  # already gone
                process.kill()
        for process in workers:
            process.join(timeout=10)


def sources_to_stage(settings: EtlSettings, echo: Callable[[str], None]) -> list[str]:
    """The sources this run stages: those `freshness` does not find unchanged (--force: all).

    Like unchanged shards, an unchanged source gets no Dagster step: its last staging stands
    (proven by the warehouse manifest), and so do its checks' results; a `source_skip` line
    says why.
    """
    states = freshness.source_states(settings)
    for name, state in states.items():
        if state.unchanged:
            echo(format_event({"event": "source_skip", "source": name, "reason": state.reason}))
    return [name for name, state in states.items() if not state.unchanged]


def shards_to_run(
    settings: EtlSettings, echo: Callable[[str], None]
) -> tuple[list[int], dict[int, ShardRow]]:
    """(the shards this run builds, a skipped row for each other shard).

    A shard `freshness` finds current (the warehouse already holds its rows from the same
    inputs and code) is not run at all, not even as a Dagster run; a `shard_skip` line says
    why. --force runs every shard, and the chaos drill its shard.
    """
    todo, skipped = [], {}
    for shard_id, state in freshness.shard_states(settings).items():
        if not state.current:
            todo.append(shard_id)
            continue
        records = int(state.entry["record_count"])
        echo(format_event({"event": "shard_skip", "shard_id": shard_id, "record_count": records,
                           "reason": state.reason}))
        skipped[shard_id] = ShardRow(shard_id=shard_id, records=records, ok=True, skipped=True)
    return todo, skipped


def shard_inputs_recorded(settings: EtlSettings, instance: dg.DagsterInstance) -> bool:
    """True if `shard_inputs` was recorded after every source's current staging.

    Its step records every shard's version at once, so one event newer than every staged
    pointer means the UI's per-shard versions are current. A run that died between staging a
    source and that step leaves it older, and the next run records it again.
    """
    event = instance.get_latest_materialization_event(names_for(settings).shard_inputs)
    if event is None:
        return False
    try:
        staged_ns = max(staging.pointer_mtime_ns(settings.staging_dir, s.name)
                        for s in settings.declaration.sources)
    except OSError:
        return False
    return event.timestamp * 1e9 > staged_ns


def _never() -> bool:
    return False


def run_pipeline(
    settings: EtlSettings,
    echo: Callable[[str], None] = print,
    verbose: bool = False,
    workers: int = 1,
    instance: dg.DagsterInstance | None = None,
    interrupted: Callable[[], bool] = _never,
    progress: Progress | None = None,
) -> RunOutcome:
    """Materialize everything for `settings` in `instance` (default: the one at DAGSTER_HOME).

    Up to `workers` shard partitions run at once, each as its own Dagster run in its own
    process; the results are identical for any number of workers.

    A KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by the CLI) kills the workers,
    marks the Dagster runs they left in progress as canceled and raises `Interrupted(phase)`.
    Dagster itself turns a signal that arrives inside a run of this process into a failed
    step; `interrupted()` tells the runner that this happened, so it stops there too.
    """
    if instance is None:
        with dg.DagsterInstance.get() as own:
            return run_pipeline(settings, echo, verbose, workers, own, interrupted, progress)
    progress = progress or Progress(silent=True)
    pool = _LazyPool(workers, settings.shard_count)
    outcome = RunOutcome(export_path=settings.export_path, snapshot_path=settings.snapshot_path)
    # Every run also says who launched it (the UI filters on it; a step reads it to leave the
    # DuckDB threads as this command shares them out among its workers).
    tags = {INVOCATION_TAG: uuid.uuid4().hex, LAUNCHED_BY_TAG: LAUNCHED_BY_CLI}
    try:
        if freshness.guess_shards_needed(settings):
            pool.start(early=True)  # so that the workers' start overlaps the sources
        _run_all(settings, echo, verbose, pool, instance, outcome, tags, interrupted, progress)
        return outcome
    except KeyboardInterrupt as exc:
        pool.kill()
        _cancel_unfinished(instance, tags)
        raise Interrupted(outcome.phase) from exc
    finally:
        pool.shutdown()


def _cancel_unfinished(instance: dg.DagsterInstance, tags: dict[str, str]) -> None:
    """Mark this invocation's runs that never finished (their worker was killed) as canceled."""
    unfinished = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                  dg.DagsterRunStatus.STARTED]
    for run in instance.get_runs(dg.RunsFilter(tags=tags, statuses=unfinished)):
        instance.report_run_canceled(run, message="etl-assets run was interrupted")


def _run_all(
    settings: EtlSettings, echo: Callable[[str], None], verbose: bool,
    pool: _LazyPool, instance: dg.DagsterInstance, outcome: RunOutcome, tags: dict[str, str],
    interrupted: Callable[[], bool], progress: Progress,
) -> None:
    defs, names = build_defs(settings), names_for(settings)
    run_config = {} if verbose else QUIET_RUN_CONFIG

    def execute(job_name: str, **kwargs: Any) -> dg.ExecuteInProcessResult:
        if interrupted():
            raise KeyboardInterrupt
        result = defs.resolve_job_def(job_name).execute_in_process(
            instance=instance, raise_on_error=False, run_config=run_config, tags=tags, **kwargs
        )
        outcome.run_ids.append(result.run_id)
        if interrupted():
            raise KeyboardInterrupt  # Dagster already failed the step it interrupted
        return result

    progress.start_phase("sources", "checking which source files changed")
    changed = sources_to_stage(settings, echo)
    progress.expect(len(changed), f"{len(changed)} of {len(names.source_names)} sources to stage"
                    + (f" ({', '.join(changed)})" if changed else ", the others unchanged"))
    if changed or not shard_inputs_recorded(settings, instance):
        result = execute(names.sources_job,
                         asset_selection=[names.key(name) for name in changed] + [names.shard_inputs])
        for evaluation in result.get_asset_check_evaluations():
            name = f"{evaluation.asset_key.to_user_string()}.{evaluation.check_name}"
            outcome.checks.append((name, evaluation.passed, metadata_values(evaluation)))
            if not evaluation.passed and not outcome.reason:
                outcome.reason = evaluation.description or f"check {name} failed"
        if not result.success and not outcome.reason:
            outcome.reason = first_failure(result)
        if outcome.reason:
            return

    outcome.phase = "shards"
    if interrupted():
        raise KeyboardInterrupt
    progress.start_phase("shards", "checking which shards changed")
    todo, rows = shards_to_run(settings, echo)
    progress.expect(len(todo), f"{len(todo)} of {settings.shard_count} shards to build"
                    + (", the others unchanged" if len(todo) < settings.shard_count else ""))
    workers = pool.start() if len(todo) > 1 else None
    for shard_id, run_id, success, error in _run_shards(settings, todo, workers, run_config,
                                                        instance, pool.size, tags, interrupted):
        if interrupted():
            raise KeyboardInterrupt  # a shard run here was failed by Dagster's own handler
        if run_id:
            outcome.run_ids.append(run_id)
        events = shard_events(instance, run_id) if run_id else []
        for event in events:
            echo(format_event(event))
        rows[shard_id] = shard_row(shard_id, events, success, error)
        rows[shard_id].run_id = run_id
        row = rows[shard_id]
        progress.step(f"shard {shard_id} built: {row.records or 0:,} rows in "
                      f"{(row.elapsed_ms or 0) / 1000:.1f} s" if success
                      else f"shard {shard_id} FAILED", advance=1)
    outcome.shards = [rows[k] for k in settings.shard_ids]
    outcome.reason = shard_failure_reason(outcome.shards)
    if outcome.reason:
        return

    outcome.phase = "customer_profiles"
    progress.start_phase("customer_profiles", f"merging {settings.shard_count} shards into the "
                         "table and the export (or finding them current)")
    result = execute(names.profiles_job)
    for evaluation in result.get_asset_check_evaluations():
        outcome.checks.append((evaluation.check_name, evaluation.passed, metadata_values(evaluation)))
    failed_checks = [name for name, passed, _ in outcome.checks if not passed]
    if not result.success:
        # A failed check fails the step before anything is published; its line names them.
        outcome.reason = first_failure(result)
    elif failed_checks:
        outcome.reason = f"check(s) failed: {', '.join(failed_checks)}"
