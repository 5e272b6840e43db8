"""A real Dagster daemon: change a CSV and the changed customer's profile updates by itself."""

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from etl_assets.sharding import shard_of

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def _profile_value(db: Path, customer_id: str):
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error:
        return None  # a run is writing right now
    try:
        row = con.execute("SELECT employee_count, shard_id FROM customer_profiles "
                          "WHERE customer_id = ?", [customer_id]).fetchone()
    finally:
        con.close()
    return row


def _bump(data_dir: Path, customers: list[str]) -> dict[str, int]:
    """Add 1000 to these customers' employee_count in crm.csv; return the new values."""
    path = data_dir / "crm.csv"
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    wanted = {}
    for row in rows:
        if row[0] in customers:
            row[4] = str(int(row[4]) + 1000)
            wanted[row[0]] = int(row[4])
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    path.write_text(out.getvalue(), encoding="utf-8")
    return wanted


def _wait_for(db: Path, wanted: dict[str, int], daemon: subprocess.Popen, tmp_path: Path) -> None:
    deadline = time.monotonic() + 240
    seen: dict[str, object] = {}
    while time.monotonic() < deadline:
        for customer in wanted:
            value = _profile_value(db, customer)
            if value is not None:
                seen[customer] = value[0]
        if seen == wanted:
            return
        assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
        time.sleep(2)
    raise AssertionError(f"{seen} != {wanted}\n" + (tmp_path / "daemon.log").read_text()[-3000:])


def test_daemon_rebuilds_the_changed_customer_without_a_click(tmp_path, sample_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAOS_", "SHARD_COUNT"))}
    env.update(DAGSTER_HOME=str(tmp_path / "dagster_home"), ETL_HOME=str(tmp_path / "var"),
               DATA_DIR=str(sample_dir), SENSOR_INTERVAL_S="2")
    first = subprocess.run([str(BIN / "etl-assets"), "run"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    db = tmp_path / "var" / "warehouse.duckdb"
    customer = "cust_00000123"
    before = _profile_value(db, customer)
    assert before is not None and before[1] == shard_of(customer, 10)

    log = open(tmp_path / "daemon.log", "w")
    daemon = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        time.sleep(5)  # let the sensor record its first, quiet tick
        # One customer: one run of crm + that shard + customer_profiles.
        wanted = _bump(sample_dir, [customer])
        _wait_for(db, wanted, daemon, tmp_path)
        # Customers on several shards: sources first, then each stale shard, then
        # customer_profiles through its automation condition.
        others = ["cust_00000001", "cust_00000002", "cust_00000003"]
        assert len({shard_of(c, 10) for c in others}) > 1
        _wait_for(db, _bump(sample_dir, others), daemon, tmp_path)
    finally:
        con.close()
    return row


def _bump(data_dir: Path, customers: list[str]) -> dict[str, int]:
    """Add 1000 to these customers' employee_count in crm.csv; return the new values."""
    path = data_dir / "crm.csv"
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    wanted = {}
    for row in rows:
        if row[0] in customers:
            row[4] = str(int(row[4]) + 1000)
            wanted[row[0]] = int(row[4])
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    path.write_text(out.getvalue(), encoding="utf-8")
    return wanted


def _wait_for(db: Path, wanted: dict[str, int], daemon: subprocess.Popen, tmp_path: Path) -> None:
    deadline = time.monotonic() + 240
    seen: dict[str, object] = {}
    while time.monotonic() < deadline:
        for customer in wanted:
            value = _profile_value(db, customer)
            if value is not None:
                seen[customer] = value[0]
        if seen == wanted:
            return
        assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
        time.sleep(2)
    raise AssertionError(f"{seen} != {wanted}\n" + (tmp_path / "daemon.log").read_text()[-3000:])


def test_daemon_rebuilds_the_changed_customer_without_a_click(tmp_path, sample_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAOS_", "SHARD_COUNT"))}
    env.update(DAGSTER_HOME=str(tmp_path / "dagster_home"), ETL_HOME=str(tmp_path / "var"),
               DATA_DIR=str(sample_dir), SENSOR_INTERVAL_S="2")
    first = subprocess.run([str(BIN / "etl-assets"), "run"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    db = tmp_path / "var" / "warehouse.duckdb"
    customer = "cust_00000123"
    before = _profile_value(db, customer)
    assert before is not None and before[1] == shard_of(customer, 10)

    log = open(tmp_path / "daemon.log", "w")
    daemon = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        time.sleep(5)  # let the sensor record its first, quiet tick
        path = sample_dir / "crm.csv"
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
        for row in rows:
            if row[0] == customer:
                row[4] = str(int(row[4]) + 1000)
                wanted = int(row[4])
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        path.write_text(out.getvalue(), encoding="utf-8")

        deadline = time.monotonic() + 180
        value = before
        while time.monotonic() < deadline:
            value = _profile_value(db, customer) or value
            if value[0] == wanted:
                break
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(2)
        assert value[0] == wanted, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
        log.close()
