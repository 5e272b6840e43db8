"""The `etl-assets` command: run the pipeline, generate data, start a declaration."""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from etl_assets.lib import errors, interrupts, limits, secrets
from etl_assets.lib.settings import (
    PG_URL_VAR,
    EtlSettings,
    SettingsError,
    dagster_home_override,
    pg_url,
    secrets_in_environment,
)
from etl_assets.tools.instance import (
    open_instance,
    quiet_postgres_retries,
    write_instance_config,
)
from etl_assets.tools.progress import Progress

if TYPE_CHECKING:
    from etl_assets.tools.outcome import RunOutcome


def _settings(args: argparse.Namespace) -> EtlSettings:
    return EtlSettings.from_env(
        data_dir=getattr(args, "data_dir", None),
        shard_count=getattr(args, "shards", None),
        export_path=getattr(args, "export", None),
        database=getattr(args, "duckdb", None),
        force=getattr(args, "force", None) or None,
        pipeline=getattr(args, "pipeline", None),
    )


def ensure_writable_dir(path: Path) -> None:
    """Create `path` if needed and prove it takes a file; PathError naming what is wrong.

    Run before any work, so a home that is a file, read-only or full gives one line at once
    instead of an error from deep inside a step.
    """
    if path.exists() and not path.is_dir():
        raise errors.PathError(path, "is not a directory")
    with errors.naming(path):
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".etl-write-probe-{os.getpid()}"
        try:
            with open(probe, "wb") as fh:
                fh.write(b"ok")
                os.fsync(fh.fileno())
        finally:
            probe.unlink(missing_ok=True)


def prepare_dagster_home(settings: EtlSettings) -> Path:
    """Use DAGSTER_HOME if set, else the git-ignored default; create its folder and config.

    The config (`tools.instance.instance_yaml`) keeps runs in SQLite inside the home, or in
    PostgreSQL when DAGSTER_PG_URL is set, and sets the run queue's limits for this machine.
    """
    url = pg_url()  # checked before anything is written
    home = Path(dagster_home_override() or settings.dagster_home).resolve()
    if set(str(home)) & set("?%"):
        # Dagster opens its SQLite storage through a URL: a "?" or "%" in the folder would
        # silently put the runs somewhere else (at the path cut at "?").
        raise errors.PathError(home, "DAGSTER_HOME cannot contain '?' or '%' (Dagster's "
                               "SQLite storage URL would point elsewhere)")
    ensure_writable_dir(home)
    with errors.naming(home):
        settings.hook("dagster_home_write")
        write_instance_config(home, settings, url)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def ensure_dagster_home(settings: EtlSettings) -> Path:
    """`prepare_dagster_home`, then create the instance's storage so runs can be recorded."""
    home = prepare_dagster_home(settings)
    # Create the storage now: schema creation races when several processes (concurrent shard
    # runs) open a brand-new home (SQLite) or database (Postgres) at the same moment.
    with open_instance():
        pass
    return home


@contextmanager
def one_run_at_a_time(settings: EtlSettings, interrupted: Callable[[], bool]) -> Iterator[None]:
    """Hold the home's run lock: a second `etl-assets run` on the same home waits, then finds
    the work done (unchanged sources and shards are skipped), instead of racing the first one
    through a brand-new Dagster home, the staging folders and the warehouse."""
    Path(settings.run_lock_path).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(settings.run_lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting: another etl-assets run holds {lock.lock_file}", flush=True)
        while True:  # in short waits, so that Ctrl-C still ends the wait
            try:
                lock.acquire(timeout=0.2)
                break
            except Timeout:
                if interrupted():
                    raise interrupts.Interrupted("waiting for another run") from None
    try:
        yield
    finally:
        lock.release()


def preflight(settings: EtlSettings) -> None:
    """Fail at once, with one line, on folders the run could not use."""
    data = Path(settings.data_dir)
    if data.exists() and not data.is_dir():
        raise errors.PathError(data, "is not a directory (DATA_DIR / --data-dir)")
    # ETL_HOME first: when it is the problem, it is the folder to name.
    folders = [Path(settings.home_dir), settings.pipeline_dir, Path(settings.staging_dir),
               Path(settings.warehouse_dir)]
    for folder in dict.fromkeys(folders):
        ensure_writable_dir(folder)


def without_pandas() -> None:
    """Make `import pandas` fail in this process (and the workers it forks), unless loaded.

    DuckDB's Python client imports pandas, when it is installed, the first time it binds a
    query parameter, to check whether the value is a DataFrame: a cost in every process
    (docs/performance.md#dagster-and-the-process) for a module this pipeline never uses.
    Without it DuckDB binds the same values the same way.
    """
    sys.modules.setdefault("pandas", None)  # type: ignore[arg-type]


def cmd_run(args: argparse.Namespace) -> int:
    """Materialize sources, every shard and customer_profiles; print the summary."""
    without_pandas()
    settings = _settings(args)
    # Imported here, not at the top: they build the code location, which reads the
    # environment's settings, and `--help` or `generate` must work whatever it holds.
    from etl_assets.tools.runner import run_pipeline
    from etl_assets.tools.submit import submit_pipeline, webserver_url

    # A configuration error, like the settings': exit 2 before anything starts.
    if pg_url() is None and args.submit:
        raise SettingsError("--submit hands the runs to a deployment's run queue: set "
                            f"{PG_URL_VAR} to its Dagster instance (PostgreSQL)")
    if args.submit:
        webserver_url()
    # Lines appear as they happen, also through a pipe (a test, `tee`, a log collector).
    echo = functools.partial(print, flush=True)
    progress = Progress()  # stderr: a live display on a terminal, timestamped lines otherwise
    with interrupts.watching() as watch, progress.running():
        phase = "startup"
        progress.start_phase("startup", "opening the Dagster home and instance")
        try:
            preflight(settings)
            with one_run_at_a_time(settings, lambda: watch.received() is not None):
                home = prepare_dagster_home(settings)
                # A full disk under Dagster's own storage (SQLite: "database or disk is full").
                # One instance for the whole command (opening one is a large part of the
                # fixed cost: docs/performance.md#the-fixed-cost). It creates the storage
                # before any shard worker opens it, which avoids SQLite's schema-creation
                # race; on Postgres, under a lock that other processes opening the same fresh
                # database wait for.
                with errors.disk_full_at(home), open_instance() as instance:
                    phase = "sources"
                    stop = lambda: watch.received() is not None  # noqa: E731
                    if args.submit:
                        outcome = submit_pipeline(settings, instance, echo=echo, interrupted=stop)
                    else:
                        outcome = run_pipeline(settings, echo=echo, verbose=args.verbose,
                                               workers=args.workers, instance=instance,
                                               interrupted=stop, progress=progress)
                progress.start_phase("done", "every step and check passed" if outcome.ok
                                     else f"FAILED: {outcome.reason}")
        except KeyboardInterrupt as exc:
            phase = getattr(exc, "phase", phase)
            if args.verbose:
                traceback.print_exc()
            print(f"INTERRUPTED during {phase}: nothing half-published", flush=True)
            return interrupts.exit_code(watch.received() or signal.SIGINT)
    print_summary(outcome)
    if not outcome.ok:
        print(f"FAILED: {outcome.reason}")
        return 1
    return 0


def print_summary(outcome: RunOutcome) -> None:
    """The per-shard table, the check results and where the export is."""
    if outcome.shards:
        print()
        print(f"{'shard':>5}  {'attempts':>8}  {'records':>8}  {'elapsed_ms':>10}  status")
        for row in outcome.shards:
            status = ("skipped (unchanged)" if row.skipped else "ok") if row.ok \
                else f"FAILED {row.error}"[:100]
            records = "" if row.records is None else row.records
            elapsed = "" if row.elapsed_ms is None else row.elapsed_ms
            print(f"{row.shard_id:>5}  {row.attempts:>8}  {records:>8}  {elapsed:>10}  {status}")
        total = sum(r.records or 0 for r in outcome.shards)
        print(f"{'total':>5}  {'':>8}  {total:>8}")
    if outcome.checks:
        print()
        for name, passed, metadata in outcome.checks:
            figures = ", ".join(f"{k}={v}" for k, v in metadata.items())
            print(f"check {name:<32} {'PASSED' if passed else 'FAILED'}  {figures}")
    if outcome.ok and outcome.export_path:
        print()
        print(f"export: {outcome.export_path}")
        if outcome.snapshot_path:
            print(f"snapshot: {outcome.snapshot_path}")


def cmd_generate(args: argparse.Namespace) -> int:
    """Write synthetic source files: the customer domain's four, or a declaration's."""
    started = time.monotonic()
    if args.pipeline:
        from etl_assets.tools.generate_declared import generate_declared, load

        paths = generate_declared(load(args.pipeline), args.rows, seed=args.seed,
                                  out_dir=args.out)
        what = "keys"
    else:
        from etl_assets.tools.generate import generate

        paths = generate(args.rows, seed=args.seed, out_dir=args.out)
        what = "customers"
    for path in paths.values():
        print(path)
    print(f"generated {args.rows} {what} in {time.monotonic() - started:.2f}s")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Write a declaration inferred from a folder of CSV files."""
    from etl_assets.tools.init import init, summary

    sources = init(args.data_dir, args.key, args.out, force=args.force)
    for line in summary(sources):
        print(line)
    print(f"written: {args.out} (edit it: kinds, ranges, required columns, domains, derived "
          "columns)")
    return 0


def cmd_drill(args: argparse.Namespace) -> int:
    """The chaos drill end to end: shard fails once, retry heals, exactly-once verified."""
    from etl_assets.tools.drill import run_drill
    from etl_assets.tools.submit import submit_pipeline, webserver_url

    settings = EtlSettings.from_env(
        data_dir=args.data_dir, shard_count=args.shards, export_path=args.export,
        chaos_fail_shard=args.shard, chaos_fail_mode="once", pipeline=args.pipeline,
        force=True,  # the drill is about a real retry of real work, not a skip
    )
    if args.submit:  # a configuration error: exit 2 before anything starts
        if pg_url() is None:
            raise SettingsError(f"drill --submit needs {PG_URL_VAR}: the deployment's Dagster "
                                "instance")
        webserver_url()
    ensure_dagster_home(settings)
    if not args.submit:
        return run_drill(settings)
    with open_instance() as instance:
        return run_drill(settings, pipeline=functools.partial(submit_pipeline, instance=instance))


def cmd_bench(args: argparse.Namespace) -> int:
    """The scale-up benchmark: Markdown, JSON and a PNG chart in --out."""
    from etl_assets.tools.bench import run_bench

    out = Path(args.out)
    run_bench(args.rows, [int(x) for x in args.shards.split(",")],
              [int(x) for x in args.workers.split(",")], out, pipeline_file=args.pipeline or "")
    print((out / "bench.md").read_text(encoding="utf-8"))
    print(f"written: {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Serve a deployment's steps from the broker, recording them in its Postgres instance."""
    from etl_assets.tools.worker import run_worker

    if pg_url() is None:
        raise SettingsError(f"etl-assets worker needs {PG_URL_VAR}: a worker records its steps "
                            "in the deployment's Dagster instance (PostgreSQL)")
    ensure_dagster_home(_settings(args))
    return run_worker(args.name, args.concurrency)


def cmd_home(args: argparse.Namespace) -> int:
    """Create the Dagster home (DAGSTER_HOME or var/dagster_home) and print its path."""
    print(ensure_dagster_home(_settings(args)))
    return 0


PIPELINE_HELP = ("the declaration file to run (ETL_PIPELINE; default: the shipped "
                 "customers.yaml); another pipeline keeps its tables, staging and export "
                 "under <home>/pipelines/<file name>/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="etl-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize sources, all shards, customer_profiles + checks")
    run.add_argument("--pipeline", help=PIPELINE_HELP)
    run.add_argument("--data-dir", help="folder with the pipeline's source files (DATA_DIR; "
                     "the shipped one's: crm.csv, billing.csv, product.csv, support.csv)")
    run.add_argument("--shards", type=int, help="number of shards (SHARD_COUNT, default 10)")
    run.add_argument("--export", help="path of the merged CSV (EXPORT_PATH)")
    run.add_argument("--duckdb", help="warehouse file (DUCKDB_PATH)")
    run.add_argument("--workers", type=int, default=limits.cores(),
                     help="shard partitions run at once, each in its own process "
                     "(default: the number of cores)")
    run.add_argument("--force", action="store_true",
                     help="recompute every source and shard even if unchanged (ETL_FORCE)")
    run.add_argument("--submit", action="store_true",
                     help="hand the runs to the deployment's run queue through its webserver "
                     "(DAGSTER_WEBSERVER_URL, DAGSTER_PG_URL) and follow them, instead of "
                     "running them here")
    run.add_argument("-v", "--verbose", action="store_true", help="also show Dagster's own logs")
    run.set_defaults(func=cmd_run)

    gen = sub.add_parser("generate", help="write synthetic source CSVs (the customer "
                         "domain's, or any declaration's with --pipeline)")
    gen.add_argument("--rows", type=int, required=True,
                     help="number of customers (keys, with --pipeline)")
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--out", default="data", help="output folder (default data/)")
    gen.add_argument("--pipeline", metavar="FILE",
                     help="a declaration (YAML): one file per source, from its kinds, ranges and "
                     "domains")
    gen.set_defaults(func=cmd_generate)

    init = sub.add_parser("init", help="write a declaration inferred from a folder of CSV files, "
                          "to edit")
    init.add_argument("--data-dir", required=True, metavar="DIR",
                      help="folder of CSV files, one source each")
    init.add_argument("--key", required=True, metavar="COLUMN",
                      help="the join column every file carries")
    init.add_argument("--out", required=True, metavar="FILE",
                      help="the declaration file to write (YAML)")
    init.add_argument("--force", action="store_true", help="replace --out if it exists")
    init.set_defaults(func=cmd_init)

    drill = sub.add_parser("drill", help="chaos drill: fail a shard once, verify exactly-once")
    drill.add_argument("--shard", type=int, default=3, help="shard to fail on attempt 1 (3)")
    drill.add_argument("--pipeline", help=PIPELINE_HELP)
    drill.add_argument("--data-dir", help="folder with the pipeline's source files")
    drill.add_argument("--shards", type=int, help="number of shards (SHARD_COUNT)")
    drill.add_argument("--export", help="path of the merged CSV (EXPORT_PATH)")
    drill.add_argument("--submit", action="store_true",
                       help="through the deployment's run queue and workers "
                       "(DAGSTER_WEBSERVER_URL, DAGSTER_PG_URL)")
    drill.set_defaults(func=cmd_drill)

    bench = sub.add_parser("bench", help="time etl-assets run against shards/workers and the floor")
    bench.add_argument("--pipeline", help="the declaration to measure (default: the shipped "
                       "customers.yaml); its data comes from `generate --pipeline`")
    bench.add_argument("--rows", type=int, default=1_000_000)
    bench.add_argument("--shards", default="1,4,10", help="comma-separated shard counts")
    bench.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    bench.add_argument("--out", default="var/bench", help="folder for bench.md/json/png")
    bench.set_defaults(func=cmd_bench)

    worker = sub.add_parser("worker", help="a Celery worker for a deployment's steps "
                            "(CELERY_BROKER_URL, DAGSTER_PG_URL)")
    worker.add_argument("--name", default="etl", help="worker name, before @host (etl)")
    worker.add_argument("--concurrency", type=int, default=1,
                        help="steps at once (1: a shard's DuckDB gets the whole machine)")
    worker.set_defaults(func=cmd_worker)

    home = sub.add_parser("home", help="create the Dagster home used by run and `make ui`")
    home.add_argument("--pipeline", help=PIPELINE_HELP)
    home.set_defaults(func=cmd_home)
    return parser


def guard_output() -> None:
    """Redact every password from what this process (and the workers it forks) prints, ours,
    the libraries' and tracebacks alike; one line per PostgreSQL wait, not one per retry."""
    known = secrets_in_environment()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, secrets.RedactingStream):
            setattr(sys, name, secrets.RedactingStream(stream, known))
    quiet_postgres_retries()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `etl-assets` console script."""
    guard_output()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)
        return interrupts.exit_code(signal.SIGINT)
    except Exception as exc:
        # Whatever raised it and wherever (a lock timeout in our own freshness check, a bad
        # home, Dagster's storage): one line a user can act on; the traceback only with -v.
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"FAILED: {errors.one_line(exc)}", flush=True)
        return 1


if __name__ == "__main__":  # python -m etl_assets.tools.cli: Python's exit, teardown included
    sys.exit(main())
