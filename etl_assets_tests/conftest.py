"""Shared fixtures: temp folders with real DuckDB files and a real, temporary Dagster home."""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from etl_assets.lib import limits
from etl_assets.lib.schema import SOURCES
from etl_assets.lib.settings import EtlSettings
from etl_assets.tools.instance import instance_yaml

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data"

# `make test-fast`, the inner loop, sets ETL_TEST_QUICK=1: there the property tests try a third
# of their generated examples. `make test` and CI always try them all.
QUICK = os.environ.get("ETL_TEST_QUICK") == "1"


def examples(full: int) -> int:
    """How many generated examples a property test tries in this session."""
    return max(3, full // 3) if QUICK else full


# Modules whose tests take longest start first, so that under xdist the long, mostly waiting
# ones (a daemon's 30 s backfill ticks) overlap everything else instead of trailing at the end.
SLOWEST_FIRST = ("test_distributed.py", "test_ui.py", "test_crash.py", "test_daemon.py",
                 "test_ducklake.py", "test_failures.py", "test_interrupt.py", "test_bench.py",
                 "test_other_domain.py", "test_hostile.py", "test_properties.py")
# Modules whose tests share one expensive module fixture (a `dagster dev`, homes built by real
# runs) and, for test_ui and test_failures, use it in file order or in place: each goes to one
# xdist worker as a whole.
ONE_WORKER = ("test_ui.py", "test_crash.py", "test_interrupt.py", "test_failures.py",
              "test_ducklake.py", "test_distributed.py")


# Modules made of many real pipeline runs (publish, skip, integrity, concurrency, property
# and hostile-input runs, DuckLake on PostgreSQL): `make test` runs them, the inner loop
# (`make test-fast`, marker `slow`) does not, to stay within its 90 s.
SLOW_MODULES = ("test_publish.py", "test_integrity.py", "test_skip.py", "test_pipeline.py",
                "test_ducklake.py", "test_concurrency.py", "test_hostile.py",
                "test_properties.py", "test_freshness.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: file order within each module stays


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Each test on its own, except the ONE_WORKER modules, which go to one worker whole.

    (xdist's own `--dist loadgroup` marks tests through an attribute that pytest 9 no longer
    reads, so the grouping is done here.)
    """
    from xdist.scheduler import LoadScopeScheduling

    # xdist would otherwise hand out the groups with the most tests first (its default
    # --loadscope-reorder), which put the long, few-test modules last, in the suite's tail.
    config.option.loadscopereorder = False

    class Scheduler(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if Path(module).name in ONE_WORKER else nodeid

    return Scheduler(config, log)


@pytest.fixture
def sample_dir(tmp_path: Path) -> Path:
    """A private copy of the shipped 1,000-customer sample."""
    target = tmp_path / "data"
    shutil.copytree(SAMPLE, target)
    return target


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary DAGSTER_HOME with telemetry off, set in the environment for the test."""
    home = _new_dagster_home(tmp_path / "dagster_home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture
def instance(dagster_home: Path) -> Iterator[dg.DagsterInstance]:
    """The persistent instance at the temporary DAGSTER_HOME."""
    with dg.DagsterInstance.get() as inst:
        yield inst


def _new_dagster_home(home: Path) -> Path:
    """A Dagster home with the `dagster.yaml` `etl-assets home` writes (every run's events in
    one SQLite database, no compute-log capture), so in-process runs store what a user's do
    (and faster than with Dagster's default, a database per run)."""
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(
        instance_yaml(EtlSettings.from_env(env={}), postgres=False, n_cores=limits.cores(),
                      ram=limits.ram_bytes(), home=home),
        encoding="utf-8")
    return home


@pytest.fixture
def ran_sample(tmp_path_factory: pytest.TempPathFactory,
               monkeypatch: pytest.MonkeyPatch) -> Callable[[int], EtlSettings]:
    """`ran_sample(n)`: settings of a home where the shipped sample has just run on n shards,
    with DAGSTER_HOME set to that home's Dagster home.

    The run happens once per test process and shard count; every test then gets a fresh copy
    of that home (data, staging, warehouse, export and Dagster instance) restored at the same
    absolute path, so the paths it recorded and its file times are those of a home that just
    ran. Tests in one process run one at a time, so one path per shard count is enough.
    """
    from etl_assets.tools.runner import run_pipeline

    def restore(shard_count: int) -> EtlSettings:
        root = tmp_path_factory.getbasetemp() / f"ran-sample-n{shard_count}"
        pristine = root.with_name(root.name + ".pristine")
        settings = make_settings(root, root / "data", shard_count=shard_count)
        monkeypatch.setenv("DAGSTER_HOME", str(root / "dagster_home"))
        if root.exists():
            shutil.rmtree(root)
        if pristine.exists():
            shutil.copytree(pristine, root, symlinks=True)
            return settings
        shutil.copytree(SAMPLE, root / "data")
        _new_dagster_home(root / "dagster_home")
        outcome = run_pipeline(settings, echo=lambda line: None)
        assert outcome.ok, outcome.reason
        shutil.copytree(root, pristine, symlinks=True)
        return settings

    return restore


def make_settings(tmp_path: Path, data_dir: Path, **overrides) -> EtlSettings:
    """Settings whose warehouse, staging and export live under tmp_path/var."""
    return EtlSettings.from_env(env={}, data_dir=str(data_dir), home_dir=str(tmp_path / "var"),
                                **overrides)


def write_csv(path: Path, header: Iterable[str], rows: Iterable[Iterable[object]]) -> Path:
    """Write a CSV the way a supplier would (None -> empty field)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(header))
        for row in rows:
            writer.writerow(["" if v is None else v for v in row])
    return path


def write_sources(data_dir: Path, rows: dict[str, list[dict[str, object]]]) -> Path:
    """Write all four files from dicts keyed by column name (missing keys -> empty)."""
    for name, schema in SOURCES.items():
        write_csv(
            data_dir / schema.filename,
            schema.column_names,
            ([r.get(c) for c in schema.column_names] for r in rows.get(name, [])),
        )
    return data_dir


def edit_crm(data_dir: Path, changes: dict[str, int]) -> None:
    """Set employee_count for the given customer ids in crm.csv; keep every other row as is."""
    path = data_dir / "crm.csv"
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    found = {row[0] for row in rows[1:] if row[0] in changes}
    assert found == set(changes), f"not in crm.csv: {sorted(set(changes) - found)}"
    for row in rows[1:]:
        if row[0] in changes:
            row[4] = str(changes[row[0]])
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    path.write_text(out.getvalue(), encoding="utf-8")


def read_export(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def build_profiles(settings: EtlSettings) -> dict[str, dict[str, object]]:
    """Stage, build every shard and rebuild customer_profiles without Dagster; rows by id."""
    from etl_assets.lib import profile_tables, warehouse
    from etl_assets.lib.profiles import build_shard
    from etl_assets.lib.sources import stage_source

    for schema in SOURCES.values():
        stage_source(schema, settings)
    for shard_id in settings.shard_ids:
        build_shard(settings, shard_id, run_id="test")
    with warehouse.reader(settings.database, 5) as con:
        profile_tables.rebuild_customer_profiles(con, settings.shard_count)
        cur = con.execute("SELECT * FROM wh.customer_profiles ORDER BY customer_id")
        names = [d[0] for d in cur.description]
        return {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}


@contextlib.contextmanager
def mounted(args: list[str], path: Path, what: str) -> Iterator[Path]:
    """`mount <args> <path>` (root only), always unmounted; a test that cannot mount fails
    under CI (it must not pass by being skipped) and skips elsewhere, saying `what` failed."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", *args, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        message = f"cannot {what} here: {proc.stderr.strip()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def tmpfs(path: Path, size: str, options: str = "") -> contextlib.AbstractContextManager[Path]:
    """A real, small filesystem at `path` (root only; `options` e.g. "ro"); always unmounted."""
    mount_options = ",".join(filter(None, [f"size={size}", options]))
    return mounted(["-t", "tmpfs", "-o", mount_options, "tmpfs"], path, "mount a tmpfs")


def outdated_by_a_newer_run(settings: EtlSettings, data_dir: Path, point: str) -> None:
    """Build cust_00000007's shard as an "older" run while, at hook `point`, a "newer" run
    stages a changed CRM value and writes that shard: the older must raise InputsMovedError
    and write nothing, so the warehouse keeps the newer run's manifest entry and rows."""
    from etl_assets.lib import warehouse
    from etl_assets.lib.profiles import InputsMovedError, build_shard
    from etl_assets.lib.sharding import shard_of
    from etl_assets.lib.sources import stage_source

    shard = shard_of("cust_00000007", settings.shard_count)
    newer = []

    def newer_run_meanwhile(at: str) -> None:
        if at == point and not newer:
            edit_crm(data_dir, {"cust_00000007": 4321})
            stage_source(SOURCES["crm"], settings)
            newer.append(build_shard(settings, shard, run_id="newer"))

    with pytest.raises(InputsMovedError):
        build_shard(settings, shard, run_id="older", hook=newer_run_meanwhile)
    with warehouse.read_only(settings.database, 5) as con:
        entry = warehouse.read_manifest(con, settings.shard_count)[shard]
        employees = con.execute(
            "SELECT employee_count FROM wh.shard_profiles WHERE customer_id = ?",
            ["cust_00000007"]).fetchall()
    assert (entry["run_id"], entry["source_data_hash"]) == ("newer", newer[0].source_data_hash)
    assert employees == [(4321,)]


def shard_rows(home: Path) -> dict[int, list[tuple]]:
    """Every shard_profiles row of a home's warehouse, by shard_id."""
    import duckdb

    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT * FROM shard_profiles ORDER BY shard_id, customer_id").fetchall()
    finally:
        con.close()
    by_shard: dict[int, list[tuple]] = {}
    for row in rows:
        by_shard.setdefault(row[-3], []).append(row)  # shard_id precedes key, shard_count
    return by_shard


# The tables the snapshot holds, each in a fixed order (publish.SNAPSHOT_TABLES and
# customer_profiles).
USER_TABLES = {"customer_profiles": "customer_id", "rejected_rows": "source, line_number",
               "source_manifest": "source", "shard_manifest": "shard_count, shard_id"}


def user_tables(path: str | Path) -> dict[str, list[tuple]]:
    """The rows of the tables users query, from a warehouse or a snapshot file (read-only)."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        return {table: con.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
                for table, order in USER_TABLES.items()}
    finally:
        con.close()


def old_and_new_homes(root: Path, rows: int,
                      run: Callable[[Path, Path], subprocess.CompletedProcess]) -> dict:
    """A home that processed generated data (seed 1), and the reference: what an undisturbed
    run makes of new data (seed 2). `run(home, data)` runs the pipeline there and must succeed.
    """
    from etl_assets.tools.generate import generate

    old_data, new_data = root / "old", root / "new"
    generate(rows, seed=1, out_dir=old_data)
    generate(rows, seed=2, out_dir=new_data)
    old_home, ref_home = root / "old_home", root / "ref_home"
    for home, data in ((old_home, old_data), (ref_home, new_data)):
        home.mkdir()
        proc = run(home, data)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"old_home": old_home, "ref_home": ref_home, "new_data": new_data,
            "old": shard_rows(old_home), "new": shard_rows(ref_home),
            "old_export": (old_home / "merged_output.csv").read_bytes(),
            "new_export": (ref_home / "merged_output.csv").read_bytes()}


def processes_of(home: Path) -> list[int]:
    """Live processes started for this home (their environment names it), zombies aside."""
    marker = f"ETL_HOME={home}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0") and \
                    (proc / "stat").read_text().split(") ")[-1][0] != "Z":
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def no_survivors(home: Path, what: str, timeout_s: float = 30) -> None:
    """Wait (bounded) until no process started for `home` is alive; fail naming `what`."""
    import time

    deadline = time.monotonic() + timeout_s
    while processes_of(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_of(home) == [], f"{what} outlived the run"


def unavailable(message: str) -> None:
    """A test's own server or tool could not be had: skip locally, fail under CI."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass(frozen=True)
class PgCluster:
    """A throwaway PostgreSQL server on 127.0.0.1 (trust authentication, no password)."""

    port: int

    def url(self, database: str = "postgres", scheme: str = "postgresql") -> str:
        return f"{scheme}://postgres@127.0.0.1:{self.port}/{database}"


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def process_group(args: list[str], log: Path, **popen: object) -> Iterator[subprocess.Popen]:
    """`args` in a session of its own (a server and its children), its output to `log`; the
    whole group is stopped at the end of the block (`stop_group`)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **popen)  # type: ignore[call-overload]
        try:
            yield proc
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to `proc`'s process group, SIGKILL if it has not ended within `timeout_s`."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_for_webserver(url: str, proc: subprocess.Popen, log: Path,
                       timeout_s: float = 120) -> None:
    """Until the Dagster webserver at `url` answers; fails with its log if `proc` ends first or
    it does not answer within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url + "/server_info", timeout=2)
            return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, \
                log.read_text(errors="replace")[-4000:]
            time.sleep(0.5)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One real PostgreSQL server per test process (`make postgres` installs it), started on
    first use, stopped and removed at the end. Tests get their own database from `pg_url`.

    Postgres refuses to run as root: as root, initdb and pg_ctl run as the `postgres` user, in
    a temp folder it owns. Without fsync: the data is thrown away anyway.
    """
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: make postgres")
    try:
        import psycopg2
    except ImportError:
        unavailable("psycopg2 is not installed (it comes with dagster-postgres)")
    root = Path(tempfile.mkdtemp(prefix="etl-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"
    started = False
    try:
        init = subprocess.run([*as_owner, initdb, "-D", str(data), "-A", "trust", "-U",
                               "postgres", "-E", "UTF8", "--no-sync"],
                              capture_output=True, text=True)
        if init.returncode != 0:
            unavailable(f"initdb failed: {init.stderr.strip()[-500:]}")
        for _ in range(3):  # a free port can be taken before the server binds it
            port = free_port()
            options = (f"-k {root} -c listen_addresses=127.0.0.1 -p {port} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off")
            start = subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-l", str(log), "-w",
                                    "-t", "30", "-o", options, "start"],
                                   capture_output=True, text=True)
            if start.returncode == 0:
                started = True
                break
        if not started:
            tail = log.read_text()[-500:] if log.exists() else ""
            unavailable(f"PostgreSQL did not start: {tail}")
        psycopg2.connect(PgCluster(port).url(), connect_timeout=10).close()
        yield PgCluster(port)
    finally:
        if started:
            subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh, empty database of its own for this test, dropped afterwards: its DAGSTER_PG_URL
    (the psycopg2 driver named, as etl-assets requires)."""
    name = new_database(pg_cluster, "t")
    yield pg_cluster.url(name, scheme="postgresql+psycopg2")
    _admin(pg_cluster, f"DROP DATABASE {name} WITH (FORCE)")


def _admin(cluster: PgCluster, statement: str) -> None:
    """One statement as the cluster's superuser, outside a transaction (CREATE/DROP DATABASE)."""
    import psycopg2

    admin = psycopg2.connect(cluster.url(), connect_timeout=10)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(statement)
    finally:
        admin.close()


def new_database(cluster: PgCluster, prefix: str) -> str:
    """Create an empty database with a fresh name starting with `prefix`; its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _admin(cluster, f"CREATE DATABASE {name}")  # a name made here, not input
    return name
