"""Concurrent runs in separate processes, a warehouse lock held elsewhere, and readers of the
snapshot while runs publish."""

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from etl_assets.lib.profiles import build_shard
from etl_assets.lib.schema import SOURCES
from etl_assets.lib.sharding import shard_of
from etl_assets.lib.sources import stage_source
from etl_assets.lib.warehouse import WarehouseLockedError
from etl_assets.tools.runner import run_pipeline
from etl_assets_tests.conftest import (
    build_profiles,
    edit_crm,
    make_settings,
    outdated_by_a_newer_run,
    shard_rows,
    user_tables,
)

BIN = Path(sys.executable).parent


def _table(path):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT * FROM shard_profiles ORDER BY customer_id").fetchall()
    finally:
        con.close()


@pytest.mark.cli
def test_parallel_shard_processes_equal_a_serial_run(tmp_path, sample_dir):
    serial = make_settings(tmp_path / "serial", sample_dir, shard_count=4)
    build_profiles(serial)

    parallel = make_settings(tmp_path / "parallel", sample_dir, shard_count=4)
    for schema in SOURCES.values():
        stage_source(schema, parallel)
    env = dict(os.environ, DATA_DIR=str(sample_dir), ETL_HOME=parallel.home_dir, SHARD_COUNT="4",
               DAGSTER_HOME=str(tmp_path / "dagster_home"))
    init = subprocess.run([str(BIN / "etl-assets"), "home"], env=env, capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    procs = [
        subprocess.Popen(
            [str(BIN / "dagster"), "asset", "materialize", "-m", "etl_assets.definitions",
             "--select", "shard_profiles", "--partition", str(k)],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for k in range(4)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(o[-1500:] for o in outputs)
    assert _table(parallel.database) == _table(serial.database)


def _staged(tmp_path, sample_dir, **overrides):
    settings = make_settings(tmp_path, sample_dir, shard_count=2, **overrides)
    for schema in SOURCES.values():
        stage_source(schema, settings)
    return settings


def _hold_lock(path: str, seconds: float) -> subprocess.Popen:
    code = (
        "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
        "time.sleep(float(sys.argv[2]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, path, str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_lock_held_elsewhere_fails_naming_file_and_holder(tmp_path, sample_dir):
    settings = _staged(tmp_path, sample_dir, lock_timeout_s=1.0)
    holder = _hold_lock(settings.database, 60)
    try:
        started = time.monotonic()
        with pytest.raises(WarehouseLockedError) as info:
            build_shard(settings, 0, run_id="blocked")
        waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    message = str(info.value)
    assert message.startswith(settings.database + ": still locked by process ")
    assert str(holder.pid) in message and "after 1s" in message
    assert 0.9 <= waited < 10


def test_a_short_lock_is_waited_out(tmp_path, sample_dir):
    settings = _staged(tmp_path, sample_dir, lock_timeout_s=30)
    holder = _hold_lock(settings.database, 1.5)
    try:
        result = build_shard(settings, 1, run_id="waited")
    finally:
        holder.wait()
    assert result.record_count > 0


@pytest.mark.cli
def test_three_runs_at_once_on_a_fresh_home_all_succeed_with_one_export(tmp_path, sample_dir):
    """Three `etl-assets run` started together on one new home: the first runs, the others
    wait for it and then find the work done. All exit 0, no traceback, the same export."""
    env = dict(os.environ, DATA_DIR=str(sample_dir), ETL_HOME=str(tmp_path / "var"),
               DAGSTER_HOME=str(tmp_path / "var" / "dagster_home"))
    for var in ("SHARD_COUNT", "CHAOS_FAIL_SHARD", "CHAOS_FAIL_MODE", "EXPORT_PATH"):
        env.pop(var, None)
    procs = [subprocess.Popen([str(BIN / "etl-assets"), "run", "--shards", "4",
                               "--workers", "1", "--export", str(tmp_path / f"out{i}.csv")],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-1500:] for o in outputs)
    assert not any("Traceback" in o for o in outputs)
    assert sum("waiting: another etl-assets run holds" in o for o in outputs) >= 1
    exports = {(tmp_path / f"out{i}.csv").read_bytes() for i in range(3)}
    assert len(exports) == 1 and len(exports.pop().splitlines()) == 1001


def test_a_reader_holding_the_warehouse_does_not_stop_an_unchanged_rerun(
        tmp_path, sample_dir, dagster_home):
    """A user keeps the warehouse open read-only (a notebook, the DuckDB CLI) while a run
    starts: every decision and check of an unchanged re-run only reads, so it succeeds
    without waiting for the lock."""
    from etl_assets.tools.runner import run_pipeline

    settings = make_settings(tmp_path, sample_dir, shard_count=2, lock_timeout_s=1.0)
    assert run_pipeline(settings, echo=lambda line: None).ok
    code = ("import duckdb, sys, time; c = duckdb.connect(sys.argv[1], read_only=True); "
            "print(c.execute('SELECT count(*) FROM customer_profiles').fetchone()[0], "
            "flush=True); time.sleep(60)")
    reader = subprocess.Popen([sys.executable, "-c", code, settings.database],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "1000"
        again = run_pipeline(settings, echo=lambda line: None)
    finally:
        reader.kill()
        reader.wait()
    assert again.ok, again.reason
    assert all(r.skipped for r in again.shards)


# A reader of the snapshot, as a user's session would hold it: prints the row count and a digest
# of customer_profiles on start and for each line it reads; "reopen" reconnects first.
SNAPSHOT_READER = """
import duckdb, sys
def digest(con):
    return con.execute("SELECT count(*), md5(string_agg(p::VARCHAR, '|' ORDER BY customer_id)) "
                       "FROM customer_profiles p").fetchone()
con = duckdb.connect(sys.argv[1], read_only=True)
print(*digest(con), flush=True)
for line in sys.stdin:
    if line.strip() == "reopen":
        con.close()
        con = duckdb.connect(sys.argv[1], read_only=True)
    print(*digest(con), flush=True)
"""

CHANGE = {"cust_00000007": 4321}  # one CRM value: one shard and customer_profiles rebuild


def _digest(path: str) -> str:
    con = duckdb.connect(path, read_only=True)
    try:
        return " ".join(map(str, con.execute(
            "SELECT count(*), md5(string_agg(p::VARCHAR, '|' ORDER BY customer_id)) "
            "FROM customer_profiles p").fetchone()))
    finally:
        con.close()


def test_a_reader_of_the_snapshot_keeps_its_rows_while_a_changed_run_publishes(
        tmp_path, sample_dir, dagster_home):
    """A user's session holds the snapshot open while a run with a changed source rebuilds a
    shard and customer_profiles: the run neither waits nor fails (lock timeout 1 s), the
    session keeps reading the rows it opened, and reconnecting gives the new ones, equal to
    the warehouse's."""
    settings = make_settings(tmp_path, sample_dir, shard_count=2, lock_timeout_s=1.0)
    assert run_pipeline(settings, echo=lambda line: None).ok
    old = _digest(settings.database)
    reader = subprocess.Popen([sys.executable, "-c", SNAPSHOT_READER, settings.snapshot_path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == old
        edit_crm(sample_dir, CHANGE)
        changed = run_pipeline(settings, echo=lambda line: None)
        assert changed.ok, changed.reason
        assert [r.shard_id for r in changed.shards if not r.skipped] == \
            [shard_of("cust_00000007", 2)]
        new = _digest(settings.database)
        assert new != old
        reader.stdin.write("again\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == old  # its connection keeps the old file
        reader.stdin.write("reopen\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == new
    finally:
        reader.kill()
        reader.wait()
    assert user_tables(settings.snapshot_path) == user_tables(settings.database)
    con = duckdb.connect(settings.snapshot_path, read_only=True)
    try:  # a view over one table per shard, each stored in customer_id order
        rows = con.execute("SELECT shard_id, customer_id FROM customer_profiles").fetchall()
    finally:
        con.close()
    assert rows == sorted(rows) and len({customer for _, customer in rows}) == 1000
    # Only the published files are left: no temp file or WAL beside them.
    assert sorted(p.name for p in Path(settings.snapshot_path).parent.glob("*.duckdb*")) == \
        ["warehouse.duckdb", "warehouse.snapshot.duckdb"]


def test_a_shard_built_from_slices_restaged_meanwhile_is_not_written(tmp_path, sample_dir):
    """Two runs of one shard: the older read its slices just before a newer run staged changed
    data and wrote the shard. The older must not put its rows back over the newer ones (the
    shard would silently go stale); it fails retryably, and the newer rows stay."""
    settings = _staged(tmp_path, sample_dir)
    outdated_by_a_newer_run(settings, sample_dir, "shard_before_write")


def _launch(env: dict[str, str], cwd: Path, *args: str, **extra: str) -> subprocess.Popen:
    command = [str(BIN / args[0]), *args[1:]]
    if args[0] == "dagster":
        command[3:3] = ["-m", "etl_assets.definitions"]  # after "asset materialize"
    return subprocess.Popen(command, env=dict(env, **extra), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), \
        "\n".join(o[-2000:] for o in outputs)
    assert not any("Traceback" in o for o in outputs), "\n".join(outputs)
    return outputs


@pytest.mark.cli
def test_a_cli_run_beside_dagster_launched_runs_of_the_same_work(tmp_path, sample_dir):
    """What a UI click, a sensor or a backfill launches, at the same time as `etl-assets run` on
    one home (set up by `etl-assets home`, as `make ui` does): the run and a Dagster run of
    the four sources at once, then two Dagster runs of shard 0 at once (two backfills; with
    ETL_FORCE=1 both really rebuild it instead of finding it current). Every process exits 0
    without a traceback; shards, export and snapshot equal a serial run's."""
    home = tmp_path / "var"
    env = {k: v for k, v in os.environ.items()
           if k not in ("CHAOS_FAIL_SHARD", "CHAOS_FAIL_MODE", "EXPORT_PATH", "ETL_FORCE")}
    env.update(DATA_DIR=str(sample_dir), ETL_HOME=str(home), SHARD_COUNT="2",
               DAGSTER_HOME=str(home / "dagster_home"))
    init = _launch(env, tmp_path, "etl-assets", "home")
    serial = make_settings(tmp_path / "serial", sample_dir, shard_count=2)
    with dg.DagsterInstance.ephemeral() as instance:  # meanwhile: the reference
        assert run_pipeline(serial, echo=lambda line: None, instance=instance).ok
    _finish([init])
    _finish([_launch(env, tmp_path, "etl-assets", "run", "--shards", "2", "--workers", "1"),
             _launch(env, tmp_path, "dagster", "asset", "materialize",
                     "--select", "crm,billing,product,support")])
    backfills = _finish([_launch(env, tmp_path, "dagster", "asset", "materialize", "--select",
                                 "shard_profiles", "--partition", "0", ETL_FORCE="1")
                         for _ in range(2)])
    assert all('"event": "shard_end"' in out for out in backfills)  # both wrote, none skipped
    assert shard_rows(home) == shard_rows(Path(serial.home_dir))
    assert (home / "merged_output.csv").read_bytes() == Path(serial.export_path).read_bytes()
    assert user_tables(home / "warehouse.snapshot.duckdb")["customer_profiles"] == \
        user_tables(serial.snapshot_path)["customer_profiles"]


def test_get_connection_waits_for_a_writer_within_its_bound_and_keeps_its_limits(ran_sample):
    """Issue 32, item 4: `warehouse.get_connection()`, the call every Dagster engineer writes,
    is the short-write connection: the warehouse attached as the default database for the
    block only, the resource's memory limit and threads applied, and a wait for another writer
    bounded by lock_timeout_s (DuckDBResource's own opened the file with DuckDB's defaults and
    retried for about 100 s). Here another process holds the warehouse as a run's write does."""
    from etl_assets.defs.resources import WarehouseResource

    settings = ran_sample(4)
    path = settings.database
    hold = [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(float(sys.argv[2])); c.close()", path]
    seen: dict[str, object] = {}

    @dg.asset
    def customers_report(warehouse: WarehouseResource) -> None:
        started = time.monotonic()
        with warehouse.get_connection() as conn:
            seen["waited"] = time.monotonic() - started
            seen["rows"], seen["memory"], seen["threads"] = conn.execute(
                "SELECT count(*), current_setting('memory_limit'), current_setting('threads') "
                "FROM customer_profiles").fetchone()
        # The block is over: another writer gets the file at once, the body still running.
        seen["after"] = subprocess.run([*hold, "0"], capture_output=True, timeout=60)

    def while_held(seconds: float, resource: WarehouseResource) -> dg.ExecuteInProcessResult:
        writer = subprocess.Popen([*hold, str(seconds)], stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline().strip() == "locked"
            return dg.materialize([customers_report], resources={"warehouse": resource},
                                  raise_on_error=False)
        finally:
            writer.kill()
            writer.wait(timeout=60)

    ok = while_held(1.5, WarehouseResource(database=path, lock_timeout_s=30,
                                           memory_limit="512MB", threads=1))
    assert ok.success
    assert seen["rows"] == 1000 and seen["waited"] >= 0.5  # it waited for the writer
    assert (seen["memory"], int(seen["threads"])) == ("488.2 MiB", 1)
    assert seen["after"].returncode == 0, seen["after"].stderr
    started = time.monotonic()
    bounded = while_held(60, WarehouseResource(database=path, lock_timeout_s=1))
    assert not bounded.success and time.monotonic() - started < 20
    assert "still locked" in str(bounded.get_step_failure_events()[0].step_failure_data.error)
