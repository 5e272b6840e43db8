"""The scale-up benchmark: `etl-assets run` per shard/worker setting beside the single-query floor.

Every measured command runs as its own process, in a fresh ETL_HOME and DAGSTER_HOME, so wall
time and peak RSS are what a user would see; the data is generated in a child process too (see
the launcher below). After the first run: an unchanged re-run, a one-row change and the
realistic refreshes (REFRESHES), each beside a first run in a fresh home on the same edited
files. Results go to bench.md, bench.json and bench.png in the output folder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

BIN = Path(sys.executable).parent
_SHARD_LINE = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+ok")

# The floor: one DuckDB query that reads the four CSVs, joins, scores with the same rules and
# writes a table. Run in a subprocess so its RSS is measured like the pipeline's.
FLOOR_SCRIPT = """
import sys, duckdb
from etl_assets.lib.rules import install_rules
data, db = sys.argv[1], sys.argv[2]
con = duckdb.connect(db)
install_rules(con)
con.execute('''CREATE OR REPLACE TABLE profiles AS
  WITH crm AS (SELECT * FROM read_csv($d || '/crm.csv')),
       billing AS (SELECT * FROM read_csv($d || '/billing.csv')),
       product AS (SELECT * FROM read_csv($d || '/product.csv')),
       support AS (SELECT * FROM read_csv($d || '/support.csv'))
  SELECT coalesce(crm.customer_id, billing.customer_id, product.customer_id,
                  support.customer_id) AS customer_id,
         coalesce(crm.email, billing.email, product.email, support.email) AS email,
         etl_health_score(product.usage_pct, billing.payment_status, support.nps_score,
                          support.open_tickets) AS health_score,
         etl_churn_risk(product.usage_pct, billing.payment_status, support.nps_score,
                        support.open_tickets) AS churn_risk,
         etl_expansion_potential(product.usage_pct, billing.plan, support.nps_score,
                                 crm.deal_stage) AS expansion_potential
  FROM crm FULL JOIN billing USING (customer_id) FULL JOIN product USING (customer_id)
       FULL JOIN support USING (customer_id)''', {"d": data})
print(con.execute("SELECT count(*) FROM profiles").fetchone()[0])
"""

# The same, shaped like our output: every column of the four files joined and scored, sorted by
# customer_id into a table, then exported as CSV. No validation, staging, shards, checks or
# Dagster: the least any pipeline producing merged_output.csv has to do.
FULL_FLOOR_SCRIPT = """
import sys, duckdb
from etl_assets.lib.rules import install_rules
data, db, out = sys.argv[1], sys.argv[2], sys.argv[3]
con = duckdb.connect(db)
con.execute("SET enable_progress_bar = false")
install_rules(con)
con.execute('''CREATE OR REPLACE TABLE profiles AS
  WITH crm AS (SELECT * FROM read_csv($d || '/crm.csv')),
       billing AS (SELECT * EXCLUDE (email) FROM read_csv($d || '/billing.csv')),
       product AS (SELECT * EXCLUDE (email) FROM read_csv($d || '/product.csv')),
       support AS (SELECT * EXCLUDE (email) FROM read_csv($d || '/support.csv'))
  SELECT *,
         etl_health_score(usage_pct, payment_status, nps_score, open_tickets) AS health_score,
         etl_churn_risk(usage_pct, payment_status, nps_score, open_tickets) AS churn_risk,
         etl_expansion_potential(usage_pct, plan, nps_score, deal_stage) AS expansion_potential
  FROM crm FULL JOIN billing USING (customer_id) FULL JOIN product USING (customer_id)
       FULL JOIN support USING (customer_id)
  ORDER BY customer_id''', {"d": data})
con.execute("COPY profiles TO $out (FORMAT csv, HEADER true)", {"out": out})
print(con.execute("SELECT count(*) FROM profiles").fetchone()[0])
"""
FULL_FLOOR_LABEL = "full-width floor: one query, all columns, sorted table + CSV export"

# Each phase's own floor: one DuckDB query doing that phase's work and nothing else (no
# validation, quarantine, manifests, transactions or Dagster), timed one after the other in one
# process. sources: read each CSV once with its types and write it as Parquet split by shard;
# shards: join the four staged sets and score every customer (the pipeline's merge query) into
# one table; customer_profiles + checks: that table sorted by customer_id, its CSV export, and
# one pass counting rows, distinct ids and keys. Prints the three times as JSON.
PHASE_FLOOR_SCRIPT = """
import json, os, sys, time, duckdb
from etl_assets.lib.rules import install_rules, merge_sql
from etl_assets.lib.schema import SOURCES
data, db, staged, out, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
os.makedirs(staged, exist_ok=True)
con = duckdb.connect(db)
con.execute("SET enable_progress_bar = false")
install_rules(con)
times = {}
started = time.monotonic()
for name, schema in SOURCES.items():
    types = {c.name: "VARCHAR" if c.kind == "category" else c.sql_type for c in schema.columns}
    con.execute(
        "COPY (SELECT *, md5(customer_id) AS row_hash, etl_shard(customer_id, $n) AS shard_id "
        "FROM read_csv($f, header = true, columns = $types)) "
        "TO $dir (FORMAT parquet, PARTITION_BY (shard_id))",
        {"f": f"{data}/{schema.filename}", "types": types, "n": n, "dir": f"{staged}/{name}"})
times["sources_s"] = time.monotonic() - started
started = time.monotonic()
for name in SOURCES:
    con.execute(f"CREATE VIEW {name} AS SELECT * EXCLUDE (shard_id) FROM "
                f"read_parquet('{staged}/{name}/*/*.parquet', hive_partitioning = true)")
con.execute(f"CREATE TABLE shard_profiles AS {merge_sql()}", {"shard_id": 0})
times["shards_s"] = time.monotonic() - started
started = time.monotonic()
con.execute("CREATE TABLE customer_profiles AS SELECT * FROM shard_profiles ORDER BY customer_id")
con.execute("COPY customer_profiles TO $out (FORMAT csv, HEADER true)", {"out": out})
con.execute("SELECT count(*), count(DISTINCT customer_id), count(DISTINCT idempotency_key) "
            "FROM customer_profiles").fetchall()
times["profiles_s"] = time.monotonic() - started
print(json.dumps({k: round(v, 2) for k, v in times.items()}))
"""
PHASE_FLOOR_LABEL = "phase floors: one DuckDB query per phase's work"

# The same command on a tiny input: what process start, the Dagster instance and one Dagster run
# per job and shard cost whatever the data, i.e. the part of every figure no data work explains.
FIXED_ROWS = 1_000


def fixed_cost_label(shards: int, workers: int) -> str:
    """The label of the fixed-cost row for this configuration."""
    return f"fixed cost: etl-assets run --shards {shards} --workers {workers} on {FIXED_ROWS:,} customers"


# The realistic refreshes measured after the one-row change (see REFRESHES): the share of one
# source's rows changed at scattered positions (drawn with the seed), and the share of new
# customers appended to every source.
SCATTER_FRACTION = 0.01
APPEND_FRACTION = 0.005
REFRESH_SEED = 7

# Where a run's time goes, read from Dagster's own run records: the span of each job's runs.
PHASES = {"sources_job": "sources_s", "shards_job": "shards_s", "profiles_job": "profiles_s"}


@dataclass
class Measurement:
    """One measured command."""

    label: str
    shards: int | None
    workers: int | None
    wall_s: float
    peak_rss_mb: float
    rows_per_s: float
    slowest_shard_ms: int | None = None
    shard_compute_s: float | None = None
    other_s: float | None = None
    phases: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAOS_", "SHARD_COUNT"))}
    env.update(ETL_HOME=str(home), DAGSTER_HOME=str(home / "dagster_home"), DATA_DIR=str(data))
    if force:
        env["ETL_FORCE"] = "1"
    return env


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
            span = spans.setdefault(PHASES.get(record.dagster_run.job_name, "other_s"),
                                    [record.start_time, record.end_time])
            span[0], span[1] = min(span[0], record.start_time), max(span[1], record.end_time)
    phases = {name: round(end - start, 2) for name, (start, end) in sorted(spans.items())}
    phases["outside_runs_s"] = round(wall - sum(phases.values()), 2)
    return phases


def _run(home: Path, data: Path, shards: int, workers: int, rows: int, label: str) -> Measurement:
    since = time.time()
    wall, rss, out = _measure(
        [str(BIN / "etl-assets"), "run", "--shards", str(shards), "--workers", str(workers)],
        _pipeline_env(home, data), home)
    elapsed = [int(m.group(4)) for m in map(_SHARD_LINE.match, out.splitlines()) if m]
    compute = sum(elapsed) / 1000 / max(1, min(workers, shards)) if elapsed else None
    return Measurement(label, shards, workers, round(wall, 2), round(rss, 1),
                       round(rows / wall), max(elapsed) if elapsed else None,
                       round(compute, 2) if compute is not None else None,
                       round(wall - compute, 2) if compute is not None else None,
                       phases=_phases(home / "dagster_home", since, wall))


def run_bench(rows: int, shard_counts: list[int], worker_counts: list[int], out_dir: Path,
              echo=print) -> list[Measurement]:
    """Generate data, measure the floor and every configuration, then the re-runs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    gen_s, gen_rss, _ = _measure(
        [str(BIN / "etl-assets"), "generate", "--rows", str(rows), "--seed", "42", "--out", str(data)],
        dict(os.environ), out_dir)
    echo(f"generated {rows} customers in {gen_s:.2f}s")
    results: list[Measurement] = []

    floor_home = work / "floor"
    floor_home.mkdir(parents=True)
    wall, rss, _ = _measure([sys.executable, "-c", FLOOR_SCRIPT, str(data),
                             str(floor_home / "floor.duckdb")], dict(os.environ), floor_home)
    results.append(Measurement("floor: one DuckDB query", None, None, round(wall, 2),
                               round(rss, 1), round(rows / wall),
                               extra={"generate_s": round(gen_s, 2),
                                      "generate_peak_rss_mb": round(gen_rss, 1)}))
    echo(f"floor {wall:.2f}s")
    wall, rss, _ = _measure([sys.executable, "-c", FULL_FLOOR_SCRIPT, str(data),
                             str(floor_home / "full.duckdb"), str(floor_home / "full.csv")],
                            dict(os.environ), floor_home)
    results.append(Measurement(FULL_FLOOR_LABEL, None, None, round(wall, 2), round(rss, 1),
                               round(rows / wall)))
    echo(f"full-width floor {wall:.2f}s")
    results.append(_phase_floors(data, floor_home, rows, max(shard_counts)))
    echo(f"phase floors {results[-1].phases}")
    shutil.rmtree(floor_home)

    last_home = None
    for shards in shard_counts:
        for workers in worker_counts:
            home = work / f"s{shards}-w{workers}"
            home.mkdir()
            m = _run(home, data, shards, workers, rows,
                     f"etl-assets run --shards {shards} --workers {workers}")
            results.append(m)
            echo(f"shards={shards} workers={workers}: {m.wall_s}s, {m.peak_rss_mb} MB")
            last_home = (home, shards, workers)

    if last_home is not None:
        home, shards, workers = last_home
        m = _run(home, data, shards, workers, rows, "unchanged re-run (skips)")
        results.append(m)
        echo(f"unchanged re-run: {m.wall_s}s")
        _change_one_row(data / "billing.csv")
        m = _run(home, data, shards, workers, rows, "one row changed re-run")
        results.append(m)
        echo(f"one-row-changed re-run: {m.wall_s}s")
        customers = rows
        for label, edit in REFRESHES:
            customers += edit(data, customers)
            refresh, fresh = _refresh(work, home, data, shards, workers, customers, label)
            results += [refresh, fresh]
            echo(f"{label}: {refresh.wall_s}s, a first run on the same files {fresh.wall_s}s "
                 f"({refresh.extra['of_first_run']:.0%})")
        results.append(_fixed_cost(work, shards, workers))
        echo(f"fixed cost: {results[-1].wall_s}s")
    _write_reports(results, rows, out_dir)
    shutil.rmtree(work, ignore_errors=True)
    return results


def _phase_floors(data: Path, home: Path, rows: int, shards: int) -> Measurement:
    """One query per phase, each timed on its own (see PHASE_FLOOR_SCRIPT)."""
    wall, rss, out = _measure([sys.executable, "-c", PHASE_FLOOR_SCRIPT, str(data),
                               str(home / "phases.duckdb"), str(home / "phases_staged"),
                               str(home / "phases.csv"), str(shards)], dict(os.environ), home)
    phases = json.loads(out.strip().splitlines()[-1])
    phases["outside_runs_s"] = round(wall - sum(phases.values()), 2)
    return Measurement(PHASE_FLOOR_LABEL, shards, None, round(wall, 2), round(rss, 1),
                       round(rows / wall), phases=phases)


def _fixed_cost(work: Path, shards: int, workers: int) -> Measurement:
    """The configuration on FIXED_ROWS customers, every source and shard recomputed."""
    data = work / "fixed_data"
    _measure([str(BIN / "etl-assets"), "generate", "--rows", str(FIXED_ROWS), "--seed", "42",
              "--out", str(data)], dict(os.environ), work)
    home = work / "fixed"
    home.mkdir()
    return _run(home, data, shards, workers, FIXED_ROWS, fixed_cost_label(shards, workers))


def _refresh(work: Path, home: Path, data: Path, shards: int, workers: int, rows: int,
             label: str) -> tuple[Measurement, Measurement]:
    """The re-run after an edit of the files, then a first run on the same files in a fresh
    home: what the refresh saves is read against the second, not against an older first run."""
    refresh = _run(home, data, shards, workers, rows, label)
    fresh_home = work / "fresh"
    fresh_home.mkdir()
    fresh = _run(fresh_home, data, shards, workers, rows, fresh_label(label))
    # Both must publish the same export: a refresh that saves time by being wrong saves nothing.
    exports = [h / "merged_output.csv" for h in (home, fresh_home)]
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


def _records(path: Path) -> int:
    """Lines after the header (the generated files quote no line break)."""
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 22), b"")) - 1


def change_scattered(data: Path, rows: int, fraction: float = SCATTER_FRACTION,
                     seed: int = REFRESH_SEED) -> int:
    """Change the `mrr` of `fraction` of billing.csv's records, at positions drawn with `seed`
    across the whole file (a source refreshed here and there, not in one stretch). Returns 0:
    no customer is added."""
    path = data / "billing.csv"
    records = _records(path)
    chosen = set(random.Random(seed).sample(range(records), max(1, round(records * fraction))))
    tmp = path.with_name(path.name + ".edit")
    with open(path, "rb") as src, open(tmp, "wb") as out:
        out.write(src.readline())
        for i, line in enumerate(src):
            if i in chosen:
                fields = line.split(b",", 4)  # customer_id,email,plan,mrr,...: none quoted
                fields[3] = b"%.2f" % (float(fields[3]) + 1)
                line = b",".join(fields)
            out.write(line)
    os.replace(tmp, path)
    return 0


def append_customers(data: Path, rows: int, fraction: float = APPEND_FRACTION) -> int:
    """Append `fraction` × `rows` new customers to every source, the same new ids in all four
    (cust_ numbered after the last generated one); each new record is a copy of one of the
    file's first records under the new id. Returns how many customers were added."""
    added = max(1, round(rows * fraction))
    ids = [b"cust_%08d" % (rows + 1 + i) for i in range(added)]
    for name in ("crm", "billing", "product", "support"):
        path = data / f"{name}.csv"
        with open(path, "rb") as fh:
            fh.readline()
            templates = [fh.readline() for _ in range(min(added, 1000))]
        templates = [t for t in templates if t]
        with open(path, "ab") as out:
            out.writelines(new_id + t[t.index(b","):]
                           for new_id, t in zip(ids, itertools.cycle(templates)))
    return added


# The realistic refreshes, one after the other on the same files and home: (label, edit).
REFRESHES: list[tuple[str, Callable[[Path, int], int]]] = [
    (f"{SCATTER_FRACTION:.0%} of billing rows changed, scattered, re-run", change_scattered),
    (f"{APPEND_FRACTION:.1%} new customers in every source, re-run", append_customers),
]


def _change_one_row(path: Path) -> None:
    with open(path, "r+b") as fh:
        header = fh.readline()
        first = fh.readline()
        fields = first.split(b",")
        fields[3] = b"1.01" if fields[3] != b"1.01" else b"1.02"  # mrr of the first row
        rest = fh.read()
        fh.seek(len(header))
        fh.write(b",".join(fields) + rest)
        fh.truncate()


def _write_reports(results: list[Measurement], rows: int, out_dir: Path) -> None:
    floor = results[0].wall_s
    meta = {"rows": rows, "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "python": platform.python_version(), "floor_s": floor}
    (out_dir / "bench.json").write_text(json.dumps(
        {"machine": meta, "results": [asdict(r) for r in results]}, indent=1), encoding="utf-8")
    lines = [f"{rows:,} customers, {meta['cores']} cores, {meta['memory_gb']} GB, {meta['date']}",
             "", "| configuration | wall s | × floor | rows/s | peak RSS MB | slowest shard ms "
             "| shard compute s | sources s | shards s | customer_profiles + checks s "
             "| outside runs s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    phase_floor = next((r.phases for r in results if r.label == PHASE_FLOOR_LABEL), {})
    for r in results:
        phases = [_beside_floor(r, k, phase_floor) for k in ("sources_s", "shards_s",
                                                             "profiles_s")]
        phases.append(r.phases.get("outside_runs_s", ""))
        lines.append(f"| {r.label} | {r.wall_s} | {r.wall_s / floor:.1f} | {r.rows_per_s:,} | "
                     f"{r.peak_rss_mb} | {r.slowest_shard_ms or ''} | {r.shard_compute_s or ''} | "
                     + " | ".join(str(p) for p in phases) + " |")
    lines += ["", "sources / shards / customer_profiles + checks: from the first start to the last "
              "end of that job's Dagster runs, and in brackets that time as a multiple of the "
              "phase's own floor (the phase floors row: one DuckDB query doing that phase's "
              "work: read each CSV and write it split by shard as Parquet; join and score every "
              "shard into one table; sort it, export the CSV and count rows, ids and keys); "
              "outside runs: process start, imports and the time between runs."]
    refreshes = [r for r in results if "of_first_run" in r.extra]
    if refreshes:
        lines += ["", "Each refresh beside a first run in a fresh home on the same files:", "",
                  "| refresh | refresh s | first run s | refresh / first run |",
                  "|---|---|---|---|"]
        lines += [f"| {r.label} | {r.wall_s} | {r.extra['fresh_first_run_s']} | "
                  f"{r.extra['of_first_run']:.1%} |" for r in refreshes]
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        _chart(results, out_dir / "bench.png")
    except ModuleNotFoundError as exc:  # the chart is optional: pip install 'etl_assets[bench]'
        print(f"no chart: {exc.name} is not installed (pip install 'etl_assets[bench]')")


def _beside_floor(r: Measurement, key: str, floor: dict) -> str:
    """A run's phase time with its multiple of that phase's floor, e.g. `11.6 (3.1×)`."""
    value = r.phases.get(key)
    if value is None:
        return ""
    if r.label == PHASE_FLOOR_LABEL or not floor.get(key):
        return str(value)
    return f"{value} ({value / floor[key]:.1f}×)"


def _chart(results: list[Measurement], path: Path) -> None:
    """One bar per measured row, split into its phases (sources, shards, customer_profiles +
    checks, outside runs), the phase floors' bar first; the floors as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [("sources_s", "sources"), ("shards_s", "shards"),
              ("profiles_s", "customer_profiles + checks"), ("outside_runs_s", "outside runs")]
    rows = [r for r in results if r.phases][::-1]  # top to bottom in the table's order
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.55 * len(rows)), dpi=100)
    labels = [r.label.replace(" --shards", "\n--shards") if len(r.label) > 45 else r.label
              for r in rows]
    left = [0.0] * len(rows)
    for (key, name), colour in zip(phases, ("tab:blue", "tab:orange", "tab:green", "tab:grey"),
                                   strict=True):
        widths = [float(r.phases.get(key) or 0) for r in rows]
        ax.barh(labels, widths, left=left, color=colour, label=name)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.axvline(results[0].wall_s, color="black", linestyle="--", label="floor (one query)")
    full = [r for r in results if r.label == FULL_FLOOR_LABEL]
    if full:
        ax.axvline(full[0].wall_s, color="black", linestyle=":",
                   label="full-width floor (all columns + CSV export)")
    ax.set_xlabel("wall time (s)")
    ax.set_title("etl-assets run by phase, beside the floors")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
