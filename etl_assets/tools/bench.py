"""The scale-up benchmark: `etl-assets run` per shard/worker setting beside the floors, for any
declaration (`--pipeline`, default the shipped customers.yaml).

Every measured command runs as its own process, in a fresh ETL_HOME and DAGSTER_HOME, so wall
time and peak RSS are what a user would see; the data is generated in a child process too (see
the launcher below): the customer generator for the shipped pipeline, `generate --pipeline` for
another. After the first run: an unchanged re-run, a one-row change and the realistic refreshes
(`refreshes`), each beside a first run in a fresh home on the same edited files. The floors are
bench_floors', the edits bench_edits', the report bench_report's (bench.md, .json, .png).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from etl_assets.lib import pipeline
from etl_assets.lib.declaration import Declaration
from etl_assets.tools.bench_edits import (
    APPEND_FRACTION,
    SCATTER_FRACTION,
    append_keys,
    change_one_row,
    change_scattered,
    edit_target,
)
from etl_assets.tools.bench_report import (
    FULL_FLOOR_LABEL,
    PHASE_FLOOR_LABEL,
    Measurement,
    write_reports,
)

BIN = Path(sys.executable).parent
_SHARD_LINE = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+ok")
FLOOR_LABEL = "floor: one DuckDB query"

# The same command on a tiny input: what process start, the Dagster instance and one Dagster run
# per job and shard cost whatever the data, i.e. the part of every figure no data work explains.
FIXED_ROWS = 1_000

# Where a run's time goes, read from Dagster's own run records: the span of each job's runs
# (another pipeline's jobs carry its name first: `fleet_sources_job`).
PHASES = {"sources_job": "sources_s", "shards_job": "shards_s", "profiles_job": "profiles_s"}


@dataclass(frozen=True)
class Benched:
    """The pipeline measured: its declaration file (absolute; "" = shipped) and the words its
    report uses."""

    path: str = ""

    @functools.cached_property
    def decl(self) -> Declaration:
        return pipeline.declaration(self.path)

    @property
    def shipped(self) -> bool:
        return pipeline.is_shipped(self.path)

    @property
    def noun(self) -> str:
        """What the rows are called: customers only for the shipped pipeline."""
        return "customers" if self.shipped else "keys"

    @property
    def profiles(self) -> str:
        return pipeline.profiles_table(self.path)

    @property
    def pipeline_args(self) -> list[str]:
        """`--pipeline FILE` for another pipeline; nothing for the shipped one (its paths and
        names stay the defaults every earlier bench measured)."""
        return [] if self.shipped else ["--pipeline", self.path]

    def export(self, home: Path) -> Path:
        """Where a run in `home` writes the export (the pipeline's default)."""
        return pipeline.folder(home, self.path) / "merged_output.csv"


def fixed_cost_label(shards: int, workers: int, noun: str = "customers") -> str:
    """The label of the fixed-cost row for this configuration."""
    return f"fixed cost: etl-assets run --shards {shards} --workers {workers} on {FIXED_ROWS:,} {noun}"


def refreshes(benched: Benched) -> list[tuple[str, Callable[[Path, int], int]]]:
    """The realistic refreshes, one after the other on the same files and home: (label, edit);
    an edit takes the data folder and the key count, and returns the keys it added."""
    decl = benched.decl
    source = edit_target(decl)[0].name
    return [
        (f"{SCATTER_FRACTION:.0%} of {source} rows changed, scattered, re-run",
         functools.partial(change_scattered, decl=decl)),
        (f"{APPEND_FRACTION:.1%} new {benched.noun} in every source, re-run",
         functools.partial(append_keys, decl=decl)),
    ]


REFRESHES = refreshes(Benched())


# Runs the measured command from a small process and reports the command's own peak RSS. Linux
# carries a process's peak RSS over fork/vfork + exec into the child's ru_maxrss, so measuring
# straight from a large parent (the bench after generating data, or pytest) would report the
# parent's size for every command.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _measure(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of the command's largest process, its output)."""
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "maxrss"
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(rss_file), *args], env=env,
                              cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        wall = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
        return wall, int(rss_file.read_text()) / 1024, proc.stdout


def _pipeline_env(home: Path, data: Path, force: bool = False) -> dict[str, str]:
    # The pipeline is the bench's --pipeline, its paths the fresh home's: none of them may come
    # from the caller's environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAOS_", "SHARD_COUNT"))
           and k not in ("ETL_PIPELINE", "EXPORT_PATH", "DUCKDB_PATH", "STAGING_DIR")}
    env.update(ETL_HOME=str(home), DAGSTER_HOME=str(home / "dagster_home"), DATA_DIR=str(data))
    if force:
        env["ETL_FORCE"] = "1"
    return env


def _phase_of(job_name: str) -> str:
    return next((phase for job, phase in PHASES.items()
                 if job_name == job or job_name.endswith(f"_{job}")), "other_s")


def _phases(dagster_home: Path, since: float, wall: float) -> dict[str, float]:
    """Seconds from the first run start to the last run end of each job created since `since`,
    and the rest of the wall time (process start, imports, between runs) as outside_runs_s."""
    import dagster as dg

    spans: dict[str, list[float]] = {}
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        created_after = datetime.fromtimestamp(since, tz=UTC)
        for record in instance.get_run_records(dg.RunsFilter(created_after=created_after)):
            if record.start_time is None or record.end_time is None:
                continue
            span = spans.setdefault(_phase_of(record.dagster_run.job_name),
                                    [record.start_time, record.end_time])
            span[0], span[1] = min(span[0], record.start_time), max(span[1], record.end_time)
    phases = {name: round(end - start, 2) for name, (start, end) in sorted(spans.items())}
    phases["outside_runs_s"] = round(wall - sum(phases.values()), 2)
    return phases


def _run(benched: Benched, home: Path, data: Path, shards: int, workers: int, rows: int,
         label: str) -> Measurement:
    since = time.time()
    wall, rss, out = _measure(
        [str(BIN / "etl-assets"), "run", *benched.pipeline_args, "--shards", str(shards),
         "--workers", str(workers)], _pipeline_env(home, data), home)
    elapsed = [int(m.group(4)) for m in map(_SHARD_LINE.match, out.splitlines()) if m]
    compute = sum(elapsed) / 1000 / max(1, min(workers, shards)) if elapsed else None
    return Measurement(label, shards, workers, round(wall, 2), round(rss, 1),
                       round(rows / wall), max(elapsed) if elapsed else None,
                       round(compute, 2) if compute is not None else None,
                       round(wall - compute, 2) if compute is not None else None,
                       phases=_phases(home / "dagster_home", since, wall))


def _generate(benched: Benched, rows: int, data: Path, cwd: Path) -> tuple[float, float]:
    """Write `rows` keys of data (seed 42) in a child process; its wall seconds and peak RSS."""
    wall, rss, _ = _measure([str(BIN / "etl-assets"), "generate", *benched.pipeline_args,
                             "--rows", str(rows), "--seed", "42", "--out", str(data)],
                            dict(os.environ), cwd)
    return wall, rss


def _floor(benched: Benched, kind: str, data: Path, home: Path, *extra: str) -> tuple[float, float, str]:
    """One floor of bench_floors in its own process (its database and files in `home`)."""
    return _measure([sys.executable, "-m", "etl_assets.tools.bench_floors", kind,
                     "" if benched.shipped else benched.path, str(data),
                     str(home), *extra], dict(os.environ), home)


def run_bench(rows: int, shard_counts: list[int], worker_counts: list[int], out_dir: Path,
              echo=print, pipeline_file: str = "") -> list[Measurement]:
    """Generate data, measure the floors and every configuration, then the re-runs, for the
    declaration in `pipeline_file` ("" = the shipped one)."""
    # Absolute: every command runs in a home of its own.
    benched = Benched(str(Path(pipeline_file).resolve()) if pipeline_file else "")
    changes = refreshes(benched)  # a declaration the edits cannot serve fails before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    gen_s, gen_rss = _generate(benched, rows, data, out_dir)
    echo(f"generated {rows} {benched.noun} in {gen_s:.2f}s")
    results: list[Measurement] = []

    floor_home = work / "floor"
    floor_home.mkdir(parents=True)
    wall, rss, _ = _floor(benched, "plain", data, floor_home)
    results.append(Measurement(FLOOR_LABEL, None, None, round(wall, 2), round(rss, 1),
                               round(rows / wall), extra={"generate_s": round(gen_s, 2),
                                                          "generate_peak_rss_mb": round(gen_rss, 1)}))
    echo(f"floor {wall:.2f}s")
    wall, rss, _ = _floor(benched, "full", data, floor_home)
    results.append(Measurement(FULL_FLOOR_LABEL, None, None, round(wall, 2), round(rss, 1),
                               round(rows / wall)))
    echo(f"full-width floor {wall:.2f}s")
    results.append(_phase_floors(benched, data, floor_home, rows, max(shard_counts)))
    echo(f"phase floors {results[-1].phases}")
    shutil.rmtree(floor_home)

    last_home = None
    for shards in shard_counts:
        for workers in worker_counts:
            home = work / f"s{shards}-w{workers}"
            home.mkdir()
            m = _run(benched, home, data, shards, workers, rows,
                     f"etl-assets run --shards {shards} --workers {workers}")
            results.append(m)
            echo(f"shards={shards} workers={workers}: {m.wall_s}s, {m.peak_rss_mb} MB")
            last_home = (home, shards, workers)

    if last_home is not None:
        home, shards, workers = last_home
        m = _run(benched, home, data, shards, workers, rows, "unchanged re-run (skips)")
        results.append(m)
        echo(f"unchanged re-run: {m.wall_s}s")
        change_one_row(data, benched.decl)
        m = _run(benched, home, data, shards, workers, rows, "one row changed re-run")
        results.append(m)
        echo(f"one-row-changed re-run: {m.wall_s}s")
        keys = rows
        for label, edit in changes:
            keys += edit(data, keys)
            refresh, fresh = _refresh(benched, work, home, data, shards, workers, keys, label)
            results += [refresh, fresh]
            echo(f"{label}: {refresh.wall_s}s, a first run on the same files {fresh.wall_s}s "
                 f"({refresh.extra['of_first_run']:.0%})")
        results.append(_fixed_cost(benched, work, shards, workers))
        echo(f"fixed cost: {results[-1].wall_s}s")
    write_reports(results, rows, out_dir, benched.noun, benched.profiles)
    shutil.rmtree(work, ignore_errors=True)
    return results


def _phase_floors(benched: Benched, data: Path, home: Path, rows: int, shards: int) -> Measurement:
    """One query per phase, each timed on its own (bench_floors.phase_floors)."""
    wall, rss, out = _floor(benched, "phases", data, home, str(shards))
    phases = json.loads(out.strip().splitlines()[-1])
    phases["outside_runs_s"] = round(wall - sum(phases.values()), 2)
    return Measurement(PHASE_FLOOR_LABEL, shards, None, round(wall, 2), round(rss, 1),
                       round(rows / wall), phases=phases)


def _fixed_cost(benched: Benched, work: Path, shards: int, workers: int) -> Measurement:
    """The configuration on FIXED_ROWS keys, every source and shard recomputed."""
    data = work / "fixed_data"
    _generate(benched, FIXED_ROWS, data, work)
    home = work / "fixed"
    home.mkdir()
    return _run(benched, home, data, shards, workers, FIXED_ROWS,
                fixed_cost_label(shards, workers, benched.noun))


def _refresh(benched: Benched, work: Path, home: Path, data: Path, shards: int, workers: int,
             rows: int, label: str) -> tuple[Measurement, Measurement]:
    """The re-run after an edit of the files, then a first run on the same files in a fresh
    home: what the refresh saves is read against the second, not against an older first run."""
    refresh = _run(benched, home, data, shards, workers, rows, label)
    fresh_home = work / "fresh"
    fresh_home.mkdir()
    fresh = _run(benched, fresh_home, data, shards, workers, rows, fresh_label(label))
    # Both must publish the same export: a refresh that saves time by being wrong saves nothing.
    exports = [benched.export(h) for h in (home, fresh_home)]
    if _sha256(exports[0]) != _sha256(exports[1]):
        raise RuntimeError(f"{label}: its export differs from a first run's on the same files "
                           f"({exports[0]} vs {exports[1]})")
    shutil.rmtree(fresh_home)
    refresh.extra.update(fresh_first_run_s=fresh.wall_s,
                         of_first_run=round(refresh.wall_s / fresh.wall_s, 3))
    return refresh, fresh


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fresh_label(refresh_label: str) -> str:
    """The label of the fresh-home first run measured beside a refresh."""
    return f"first run, fresh home, same files as: {refresh_label}"
