"""A real Dagster daemon: change a CSV and the changed customers' profiles update by themselves."""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from etl_assets.defs.contracts import LAUNCHED_BY_TAG
from etl_assets.lib.sharding import shard_of
from etl_assets_tests.conftest import edit_crm, process_group

pytestmark = pytest.mark.daemon

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def _profile_values(db: Path, customers: list[str]) -> dict[str, int] | None:
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error:
        return None  # a run is writing right now
    try:
        rows = con.execute(
            "SELECT customer_id, employee_count FROM customer_profiles "
            "WHERE list_contains($ids, customer_id)", {"ids": customers},
        ).fetchall()
    finally:
        con.close()
    return dict(rows)


def _bump(data_dir: Path, customers: list[str]) -> dict[str, int]:
    """Add 1000 to these customers' employee_count in crm.csv; return the new values."""
    with open(data_dir / "crm.csv", newline="", encoding="utf-8") as fh:
        current = {row["customer_id"]: int(row["employee_count"]) for row in csv.DictReader(fh)}
    wanted = {c: current[c] + 1000 for c in customers}
    edit_crm(data_dir, wanted)
    return wanted


def _wait_for(db: Path, wanted: dict[str, int], daemon: subprocess.Popen, log: Path) -> float:
    started = time.monotonic()
    seen: dict[str, int] = {}
    while time.monotonic() - started < 240:
        seen = _profile_values(db, list(wanted)) or seen
        if seen == wanted:
            return time.monotonic() - started
        assert daemon.poll() is None, log.read_text()[-3000:]
        time.sleep(2)
    raise AssertionError(f"{seen} != {wanted}\n" + log.read_text()[-3000:])


def _settled_runs(home: Path, daemon: subprocess.Popen, log: Path) -> list[tuple]:
    """Wait until no run is queued or running; return (status, assets, partition, launched_by)
    oldest first."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            records = instance.get_run_records()
            if all(r.dagster_run.is_finished for r in records):
                time.sleep(6)  # and no sensor launches another one
                if len(instance.get_run_records()) == len(records):
                    break
            assert daemon.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        daemon_runs = [r.dagster_run for r in reversed(instance.get_run_records())
                       if r.dagster_run.tags.get("dagster/sensor_name")
                       or r.dagster_run.tags.get("dagster/tick")]
        return [(run.status.value, sorted(k.to_user_string() for k in run.asset_selection or []),
                 run.tags.get("dagster/partition"), run.tags.get(LAUNCHED_BY_TAG))
                for run in daemon_runs]


def test_daemon_rebuilds_changed_customers_without_a_click(tmp_path, sample_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAOS_", "SHARD_COUNT"))}
    env.update(DAGSTER_HOME=str(tmp_path / "dagster_home"), ETL_HOME=str(tmp_path / "var"),
               DATA_DIR=str(sample_dir), SENSOR_INTERVAL_S="2")
    first = subprocess.run([str(BIN / "etl-assets"), "run", "--workers", "1"], env=env,
                           cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    db = tmp_path / "var" / "warehouse.duckdb"
    one = ["cust_00000123"]
    several = ["cust_00000001", "cust_00000002", "cust_00000003"]
    assert len({shard_of(c, 10) for c in several}) > 1
    before = _profile_values(db, one + several)
    assert len(before) == 4

    log_path = tmp_path / "daemon.log"
    with process_group([str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
                       log_path, env=env, cwd=REPO) as daemon:
        time.sleep(5)  # let the sensor record its first, quiet tick
        # One customer: one run of crm + that shard + customer_profiles.
        _wait_for(db, _bump(sample_dir, one), daemon, log_path)
        # Several shards: sources first, then each stale shard, then customer_profiles
        # through its automation condition.
        _wait_for(db, _bump(sample_dir, several), daemon, log_path)
        runs = _settled_runs(tmp_path / "dagster_home", daemon, log_path)
    # Exactly the runs the changes needed, all successful, none twice, each tagged with the
    # sensor that requested it.
    assert all(status == "SUCCESS" for status, _, _, _ in runs), runs
    files, automation = "sensor:source_files_sensor", "sensor:profiles_automation_sensor"
    assert runs[0] == ("SUCCESS", ["crm", "customer_profiles", "shard_inputs", "shard_profiles"],
                       str(shard_of(one[0], 10)), files)
    assert runs[1] == ("SUCCESS", ["crm", "shard_inputs"], None, files)
    stale = sorted(partition for _, assets, partition, origin in runs[2:]
                   if assets == ["shard_profiles"] and origin == files)
    assert stale == sorted({str(shard_of(c, 10)) for c in several})
    assert [r for r in runs[2:] if r[1] != ["shard_profiles"]] == [
        ("SUCCESS", ["customer_profiles"], None, automation)]
