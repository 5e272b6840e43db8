"""Crash consistency: a process SIGKILLed at any write point leaves old-or-new, never a mix.

Each case really kills an `etl-assets run` subprocess (it SIGKILLs itself at a named point, or is
killed from outside mid-run), inspects what it left, then runs again and compares byte for byte
with an undisturbed run.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from etl_assets.lib.faults import CRASH_POINTS
from etl_assets_tests.conftest import no_survivors, old_and_new_homes, shard_rows, user_tables

BIN = Path(sys.executable).parent
SHARDS = "4"

pytestmark = pytest.mark.kill


def _run(home: Path, data: Path, crash_at: str = "", workers: int = 1, **popen):
    env = {k: v for k, v in os.environ.items()
           if k not in ("SHARD_COUNT", "CHAOS_FAIL_SHARD", "CHAOS_FAIL_MODE", "EXPORT_PATH")}
    env.update(ETL_HOME=str(home), DAGSTER_HOME=str(home / "dagster_home"), DATA_DIR=str(data))
    if crash_at:
        env["ETL_CRASH_AT"] = crash_at
    args = [str(BIN / "etl-assets"), "run", "--shards", SHARDS, "--workers", str(workers)]
    if popen:
        return subprocess.Popen(args, env=env, cwd=home, **popen)
    return subprocess.run(args, env=env, cwd=home, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    """Old data fully processed (home to copy), and the reference result of the new data."""
    built = old_and_new_homes(tmp_path_factory.mktemp("crash"), 1000, _run)
    return {**built, "old_snapshot": _snapshot_rows(built["old_home"]),
            "new_snapshot": _snapshot_rows(built["ref_home"])}


def _snapshot_rows(home: Path) -> list[tuple]:
    """The snapshot's customer_profiles (its file bytes differ from run to run, its rows not)."""
    return user_tables(home / "warehouse.snapshot.duckdb")["customer_profiles"]


def _assert_consistent(home: Path, states) -> None:
    """Every shard holds exactly its old rows or its new rows; files are whole."""
    now = shard_rows(home)
    for shard in range(int(SHARDS)):
        assert now.get(shard) in (states["old"][shard], states["new"][shard]), f"shard {shard} mixed"
    export = (home / "merged_output.csv").read_bytes()
    assert export in (states["old_export"], states["new_export"])
    assert _snapshot_rows(home) in (states["old_snapshot"], states["new_snapshot"])
    for pointer in (home / "staging").glob("*/current.json"):
        version = Path(__import__("json").loads(pointer.read_text())["version_dir"])
        files = sorted(version.glob("shard_id=*/*.parquet"))
        assert len({f.parent for f in files}) == int(SHARDS)
        duckdb.connect().execute("SELECT count(*) FROM read_parquet($p)", {"p": [str(f) for f in files]})
    for version in (home / "staging").glob("*/[!.]*"):
        if version.is_dir():
            shards = {f.parent for f in version.glob("shard_id=*/*.parquet")}
            assert len(shards) == int(SHARDS), f"partial {version}"


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_each_write_point_then_heal(tmp_path, states, point):
    home = tmp_path / "home"
    shutil.copytree(states["old_home"], home)
    # One worker, so the process that dies at the point is the CLI itself.
    killed = _run(home, states["new_data"], crash_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    _assert_consistent(home, states)
    healed = _run(home, states["new_data"])
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert (home / "merged_output.csv").read_bytes() == states["new_export"]
    assert _snapshot_rows(home) == states["new_snapshot"]
    assert shard_rows(home) == states["new"]


def test_a_worker_killed_mid_write_fails_cleanly_then_heals(tmp_path, states):
    """With parallel workers, the process dying inside the shard transaction is a worker."""
    home = tmp_path / "home"
    shutil.copytree(states["old_home"], home)
    failed = _run(home, states["new_data"], crash_at="shard_after_delete", workers=2)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "worker process died" in failed.stdout.strip().splitlines()[-1]
    assert "Traceback" not in failed.stdout + failed.stderr
    _assert_consistent(home, states)
    healed = _run(home, states["new_data"])
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert (home / "merged_output.csv").read_bytes() == states["new_export"]


@pytest.mark.parametrize("delay_s", [2.5, 4.0, 5.5])
def test_external_sigkill_mid_run_then_heal(tmp_path, states, delay_s):
    """Killed from outside at a moment it does not choose (sources, shards or the merge); its
    shard workers, even those still starting up, die with it."""
    home = tmp_path / "home"
    shutil.copytree(states["old_home"], home)
    proc = _run(home, states["new_data"], workers=2, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    no_survivors(home, "shard workers of the killed CLI")
    _assert_consistent(home, states)
    healed = _run(home, states["new_data"])
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert (home / "merged_output.csv").read_bytes() == states["new_export"]
