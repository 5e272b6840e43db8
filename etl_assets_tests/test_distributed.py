"""The distributed path: a deployment on PostgreSQL whose daemon launches queued runs, whose
steps Celery workers run (Redis broker), each worker started in an empty folder of its own.

One deployment for the module (a Postgres database, a Redis server, the daemon, two workers),
all real, on 127.0.0.1, removed afterwards. The client, the daemon and each worker share only
the Postgres instance, the broker and the shared storage (data, staging, warehouse, export):
each has its own Dagster home and `var/`, and the daemon's home must end up holding nothing a
step wrote.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest

from etl_assets.defs.executor import QUEUE
from etl_assets.lib import warehouse
from etl_assets.lib.settings import SettingsError
from etl_assets.lib.sharding import shard_of
from etl_assets.tools.submit import webserver_url
from etl_assets_tests.conftest import (
    SAMPLE,
    PgCluster,
    edit_crm,
    free_port,
    new_database,
    shard_rows,
    stop_group,
    unavailable,
    wait_for_webserver,
)

pytestmark = pytest.mark.daemon

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
# Variables of the test's own environment that must not leak into the deployment's processes.
# Four shards: enough for two workers to share (each launched run costs a process of its own,
# about 2.3 s of CPU here, so ten shards made this module the suite's most expensive).
SHARDS = 4
# Customers whose crm row the second run changes: three of the four shards (the fixture checks).
CHANGED = ["cust_00000001", "cust_00000004", "cust_00000008"]
DROP = ("SHARD_COUNT", "CHAOS_", "ETL_", "DAGSTER_", "DUCKDB_", "STAGING_DIR", "EXPORT_PATH",
        "DATA_DIR", "CELERY_")


def warehouse_env(shared: Path, cluster: PgCluster) -> dict[str, str]:
    """The warehouse every process of the deployment shares: a DuckLake (its catalog a database
    of its own on the test's Postgres, its Parquet data in the shared folder), as a deployment
    on several machines would have, not a DuckDB file only one host can lock."""
    lake = new_database(cluster, "lake")
    return {"DUCKDB_PATH": f"ducklake:postgres:dbname={lake} host=127.0.0.1 port={cluster.port} "
                           "user=postgres",
            "DUCKLAKE_DATA_PATH": str(shared / "lake") + "/"}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis server (Debian's redis-server, `make broker`) on 127.0.0.1, no persistence."""
    server = shutil.which("redis-server")
    if server is None:
        unavailable("redis-server not found: make broker")
    import redis

    folder = tmp_path_factory.mktemp("redis")
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(folder)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        if proc.poll() is None:
            break
    else:
        unavailable("redis-server did not start")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Deployment:
    root: Path
    shared: Path
    env: dict[str, str]
    daemon_home: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str], cwd: Path, **extra: str) -> subprocess.Popen:
        """A long-running process of the deployment, in its own session, logging to a file."""
        cwd.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(args, cwd=cwd, env={**self.env, **extra}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def worker(self, name: str, **extra: str) -> subprocess.Popen:
        """`etl-assets worker` started in an empty folder of its own (its own var/, home)."""
        folder = self.root / name
        assert not folder.exists()
        return self.start(name, [str(BIN / "etl-assets"), "worker", "--name", name], folder,
                          **extra)

    def wait_for_webserver(self) -> None:
        wait_for_webserver(self.env["DAGSTER_WEBSERVER_URL"], self.procs["webserver"],
                           self.root / "webserver.log")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-4000:]

    def celery(self):
        from etl_assets.tools.worker import make_worker_app

        return make_worker_app(self.env["CELERY_BROKER_URL"])

    def wait_for_workers(self, *names: str, timeout_s: float = 60) -> None:
        app, deadline = self.celery(), time.monotonic() + timeout_s
        wanted = {self.hostname(n) for n in names}
        while time.monotonic() < deadline:
            replies = app.control.ping(timeout=1.0) or []
            if wanted <= {host for reply in replies for host in reply}:
                return
            for name in names:
                assert self.procs[name].poll() is None, self.log(name)
        raise AssertionError(f"workers {names} did not answer:\n" + self.log(names[0]))

    @staticmethod
    def hostname(name: str) -> str:
        import socket

        return f"{name}@{socket.gethostname()}"

    def stop(self, name: str) -> None:
        stop_group(self.procs.pop(name), timeout_s=20)

    def client(self, *args: str, cwd: Path | None = None, **extra: str):
        """An `etl-assets` command from a folder of its own, against the deployment."""
        cwd = cwd or self.root / f"client-{uuid.uuid4().hex[:6]}"
        cwd.mkdir(parents=True, exist_ok=True)
        return subprocess.run([str(BIN / "etl-assets"), *args], cwd=cwd,
                              env={**self.env, **extra}, capture_output=True, text=True,
                              timeout=300)


def _embedded(root: Path, data: Path) -> subprocess.Popen:
    """The reference: the embedded `etl-assets run` of `data` in a home of its own."""
    root.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROP)}
    env.update(ETL_HOME=str(root), DATA_DIR=str(data), PYTHONPATH=str(REPO),
               SHARD_COUNT=str(SHARDS))
    return subprocess.Popen([str(BIN / "etl-assets"), "run", "--workers", "1"], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, pg_cluster: PgCluster,
               redis_url: str) -> Iterator[Deployment]:
    """Postgres database + Redis + daemon + two workers, and the embedded reference runs."""
    import psycopg2

    root = tmp_path_factory.mktemp("distributed")
    shared = root / "shared"
    new_data = root / "new_data"  # the sample with a few customers of three shards changed
    shutil.copytree(SAMPLE, new_data)
    edit_crm(new_data, {c: 5000 + i for i, c in enumerate(CHANGED)})
    assert len({shard_of(c, SHARDS) for c in CHANGED}) == 3
    references = {"sample": _embedded(root / "ref_sample", SAMPLE),
                  "new": _embedded(root / "ref_new", new_data)}
    shutil.copytree(SAMPLE, shared / "data")

    database = f"d_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(pg_cluster.url(), connect_timeout=10)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {database}")  # a name made here, not input
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROP)}
    env.update(
        PYTHONPATH=str(REPO),
        DAGSTER_PG_URL=pg_cluster.url(database, scheme="postgresql+psycopg2"),
        CELERY_BROKER_URL=redis_url,
        DATA_DIR=str(shared / "data"), STAGING_DIR=str(shared / "staging"),
        EXPORT_PATH=str(shared / "merged_output.csv"), **warehouse_env(shared, pg_cluster),
        ETL_AUTOMATION="off",  # only the runs the tests submit
        SHARD_COUNT=str(SHARDS),
        SHARD_RETRY_DELAY_S="0.5",
        # `--submit` hands its runs to the deployment's webserver (Dagster's GraphQL client).
        DAGSTER_WEBSERVER_URL=f"http://127.0.0.1:{free_port()}",
    )
    daemon_home = root / "daemon" / "dagster_home"
    dep = Deployment(root, shared, env, daemon_home)
    try:
        home = dep.client("home", cwd=root / "daemon", DAGSTER_HOME=str(daemon_home))
        assert home.returncode == 0, home.stdout + home.stderr
        dep.start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
                  root / "daemon", DAGSTER_HOME=str(daemon_home))
        port = env["DAGSTER_WEBSERVER_URL"].rsplit(":", 1)[1]
        dep.start("webserver", [str(BIN / "dagster-webserver"), "-w", str(REPO / "workspace.yaml"),
                                "-h", "127.0.0.1", "-p", port],
                  root / "daemon", DAGSTER_HOME=str(daemon_home))
        dep.worker("w1")
        dep.worker("w2")
        dep.wait_for_workers("w1", "w2")
        dep.wait_for_webserver()
        for proc in references.values():
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out
        dep.references = {name: root / f"ref_{name}" for name in references}
        dep.new_data = new_data
        yield dep
    finally:
        for name in list(dep.procs):
            dep.stop(name)
        for proc in references.values():
            if proc.poll() is None:
                proc.kill()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        admin.close()


@contextlib.contextmanager
def _instance(dep: Deployment) -> Iterator:
    """The deployment's Dagster instance, opened here (its dagster.yaml reads DAGSTER_PG_URL)."""
    import dagster as dg

    with mock.patch.dict(os.environ, {"DAGSTER_PG_URL": dep.env["DAGSTER_PG_URL"]}), \
            dg.DagsterInstance.from_config(str(dep.daemon_home)) as instance:
        yield instance


def _runs(dep: Deployment) -> list:
    with _instance(dep) as instance:
        return [r.dagster_run for r in instance.get_run_records()]


def _step_workers(dep: Deployment, run_id: str) -> list[str]:
    """The Celery worker that ran each step attempt of a run, in order (the engine events)."""
    import dagster as dg

    with _instance(dep) as instance:
        return [str(e.dagster_event.engine_event_data.metadata["Celery worker"].value)
                for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
                if "Celery worker" in (e.dagster_event.engine_event_data.metadata or {})]


def test_submit_runs_every_shard_on_the_workers(deployment: Deployment):
    dep = deployment
    proc = dep.client("run", "--submit")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out + dep.log("daemon") + dep.log("w1")
    # The same summary as the embedded run: the shard table and every check.
    assert "shard  attempts   records  elapsed_ms  status" in out
    assert "total                1000" in out
    passed = re.findall(r"^check (\S+) +PASSED", out, re.M)
    assert {"row_count_matches_sources", "no_duplicate_customer_id", "idempotency_keys_unique",
            "shards_current", "export_matches_table"} <= set(passed), out
    assert "FAILED" not in out
    # Sources, every shard and customer_profiles: all through the deployment's queue, all done.
    runs = _runs(dep)
    assert len(runs) == SHARDS + 2 and {r.status.value for r in runs} == {"SUCCESS"}, runs
    shard_runs = [r for r in runs if r.job_name == "shards_job"]
    assert sorted(int(r.tags["dagster/partition"]) for r in shard_runs) == list(range(SHARDS))
    assert {r.tags["etl/launched_by"] for r in runs} == {"cli:submit"}
    # Steps ran on the Celery workers, both of them, never in the run's own process.
    hosts = [h for r in runs for h in _step_workers(dep, r.run_id)]
    assert len(hosts) >= SHARDS + 2 and set(hosts) == {dep.hostname("w1"), dep.hostname("w2")}, hosts
    # Byte for byte what the embedded run makes of the same data.
    assert (dep.shared / "merged_output.csv").read_bytes() == \
        (dep.references["sample"] / "merged_output.csv").read_bytes()
    # Nothing a step needed went through a file in the daemon's home (an IO manager's storage).
    assert [p for p in dep.daemon_home.rglob("*") if p.is_file()] == \
        [dep.daemon_home / "dagster.yaml"]


def _stopped_child(parent: int, timeout_s: float, dep: Deployment) -> int:
    """The pid of `parent`'s child once it has stopped itself (state T)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] == "T" and int(fields[1]) == parent:
                return int(stat.parent.name)
        time.sleep(0.2)
    raise AssertionError("no worker stopped mid-write:\n" + dep.log("w3") + dep.log("daemon"))


def test_sigkilled_worker_mid_write_is_retried_elsewhere(deployment: Deployment):
    dep = deployment
    old = shard_rows_of(dep)
    app = dep.celery()
    w1, w2, w3 = (dep.hostname(n) for n in ("w1", "w2", "w3"))
    # Only w3 takes steps at first; it stops itself inside a shard's transaction (old rows
    # deleted, new inserted, not committed) and is SIGKILLed there.
    app.control.cancel_consumer(QUEUE, destination=[w1, w2], reply=True)
    try:
        dep.worker("w3", ETL_CRASH_AT="shard_before_commit", ETL_CRASH_MODE="stop")
        dep.wait_for_workers("w3")
        shutil.copy(dep.new_data / "crm.csv", dep.shared / "data" / "crm.csv")
        run = subprocess.Popen([str(BIN / "etl-assets"), "run", "--submit"],
                               cwd=dep.root, env=dep.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        try:
            child = _stopped_child(dep.procs["w3"].pid, 120, dep)
            app.control.add_consumer(QUEUE, destination=[w1, w2], reply=True)
            app.control.cancel_consumer(QUEUE, destination=[w3], reply=True)
            os.kill(child, signal.SIGKILL)
            out, _ = run.communicate(timeout=240)
        finally:
            if run.poll() is None:
                run.kill()
    finally:
        app.control.add_consumer(QUEUE, destination=[w1, w2], reply=True)
        dep.stop("w3")
    assert run.returncode == 0, out + dep.log("w3") + dep.log("daemon")
    # The killed shard ran again, on another worker, and succeeded; so did every other shard.
    retried = [line for line in out.splitlines() if line.split()[:2][-1:] == ["2"]
               and line.split()[0].isdigit()]
    assert len(retried) == 1, out
    killed = [r for r in _runs(dep) if r.tags.get("dagster/partition") == retried[0].split()[0]]
    hosts = _step_workers(dep, killed[0].run_id)  # newest first: this test's run
    assert hosts[0] == w3 and hosts[-1] in (w1, w2), hosts
    # Old or new, never a mix: every shard now holds exactly its new rows, and nothing is
    # lost: the export is the embedded run's of the new data, byte for byte.
    new = shard_rows(dep.references["new"])
    now = shard_rows_of(dep)
    assert {k for k in range(SHARDS) if old[k] != new[k]} == \
        {shard_of(c, SHARDS) for c in CHANGED}
    assert all(now[k] == new[k] for k in range(SHARDS))
    assert (dep.shared / "merged_output.csv").read_bytes() == \
        (dep.references["new"] / "merged_output.csv").read_bytes()


def shard_rows_of(dep: Deployment) -> dict[int, list[tuple]]:
    """Every shard_profiles row of the deployment's warehouse, by shard_id (as shard_rows)."""
    with warehouse.read_only(dep.env["DUCKDB_PATH"], 30) as con:
        rows = con.execute(
            "SELECT * FROM wh.shard_profiles ORDER BY shard_id, customer_id").fetchall()
    by_shard: dict[int, list[tuple]] = {}
    for row in rows:
        by_shard.setdefault(row[-3], []).append(row)  # shard_id precedes key, shard_count
    return by_shard


def test_chaos_drill_passes_on_the_workers(deployment: Deployment):
    dep = deployment
    proc = dep.client("drill", "--submit", "--shard", "3")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out + dep.log("daemon")
    timeline = out[out.index("retry timeline of shard 3"):].splitlines()
    assert "failed, retrying (ChaosFailure: chaos: shard 3 fails on attempt 1)" in timeline[2]
    assert timeline[3].split()[0] == "2" and timeline[3].split()[-1] == "success", out
    assert re.search(r"^PASS  export rows (\d+) = distinct input customers \1 ", out, re.M), out
    assert "PASS  duplicate customer_id in export: 0" in out


def test_submit_without_a_webserver_says_so(tmp_path):
    """--submit goes through the deployment's webserver: without its address, one line and exit
    2 before anything starts (nothing connects: the database named here does not exist)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROP)}
    env.update(PYTHONPATH=str(REPO),
               DAGSTER_PG_URL="postgresql+psycopg2://nobody:s3cret@127.0.0.1:1/none")
    for args, url in ((["run", "--submit"], None), (["drill", "--submit"], None),
                      (["run", "--submit"], "http://me:s3cret@127.0.0.1:3000")):
        proc = subprocess.run([str(BIN / "etl-assets"), *args], cwd=tmp_path,
                              env={**env, **({"DAGSTER_WEBSERVER_URL": url} if url else {})},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("error: ") and "DAGSTER_WEBSERVER_URL" in line, line
        assert "s3cret" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["", "127.0.0.1:3000", "ftp://host", "http://", "http://h:port",
                                 "http://h:3000?x=1"])
def test_a_webserver_address_that_is_no_url_is_refused(url):
    with pytest.raises(SettingsError, match="DAGSTER_WEBSERVER_URL"):
        webserver_url({"DAGSTER_WEBSERVER_URL": url})


def test_the_webserver_address_may_have_a_path_prefix():
    for url in ("http://127.0.0.1:3000", "https://dagster.example.com/etl/"):
        assert webserver_url({"DAGSTER_WEBSERVER_URL": f" {url} "}) == url


def test_submit_without_a_deployment_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROP)}
    proc = subprocess.run([str(BIN / "etl-assets"), "run", "--submit"], cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --submit hands the runs to a deployment's run queue: set DAGSTER_PG_URL to its "
        "Dagster instance (PostgreSQL)"]
