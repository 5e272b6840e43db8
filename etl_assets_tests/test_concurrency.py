"""Concurrent shard runs in separate processes, and a warehouse lock held elsewhere."""

import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from etl_assets.lib.profiles import build_shard
from etl_assets.lib.schema import SOURCES
from etl_assets.lib.sources import stage_source
from etl_assets.lib.warehouse import WarehouseLockedError
from etl_assets_tests.conftest import build_profiles, make_settings

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
    assert _table(parallel.duckdb_path) == _table(serial.duckdb_path)


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
    holder = _hold_lock(settings.duckdb_path, 60)
    try:
        started = time.monotonic()
        with pytest.raises(WarehouseLockedError) as info:
            build_shard(settings, 0, run_id="blocked")
        waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    message = str(info.value)
    assert message.startswith(settings.duckdb_path + ": still locked by process ")
    assert str(holder.pid) in message and "after 1s" in message
    assert 0.9 <= waited < 10


def test_a_short_lock_is_waited_out(tmp_path, sample_dir):
    settings = _staged(tmp_path, sample_dir, lock_timeout_s=30)
    holder = _hold_lock(settings.duckdb_path, 1.5)
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
    reader = subprocess.Popen([sys.executable, "-c", code, settings.duckdb_path],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "1000"
        again = run_pipeline(settings, echo=lambda line: None)
    finally:
        reader.kill()
        reader.wait()
    assert again.ok, again.reason
    assert all(r.skipped for r in again.shards)
