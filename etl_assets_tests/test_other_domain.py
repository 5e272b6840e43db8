"""Another domain, declared: a vehicle fleet that shares nothing with customers (its own files,
key, kinds and derived columns) runs through `etl-assets run --pipeline` with every guarantee,
beside the customer pipeline in the same home."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from etl_assets_tests.test_pipeline import SAMPLE_EXPORT_SHA256

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.cli

FLEET = """\
# A vehicle fleet: three sources joined on vehicle_id.
key: vehicle_id
sources:
  vehicles:
    file: vehicles.csv
    description: "The fleet register."
    columns:
      vehicle_id: {kind: id}
      make: {kind: text}
      fuel: {kind: category, domain: [Diesel, Petrol, Electric]}
      bought: {kind: date}
      price: {kind: money, min: 0}
  trips:
    file: trips.csv
    columns:
      vehicle_id: {kind: id}
      trips: {kind: int, min: 0}
      km: {kind: decimal, min: 0}
      last_trip: {kind: date}
  services:
    file: services.csv
    columns:
      vehicle_id: {kind: id}
      services: {kind: int, min: 0}
      faults: {kind: int, min: 0}
    not_greater_than: [[faults, services]]
macros:
  fleet_band:
    params: [km]
    sql: CASE WHEN km >= 2000 THEN 'HIGH' WHEN km >= 500 THEN 'MEDIUM' ELSE 'LOW' END
derived:
  km_per_trip: CASE WHEN trips > 0 THEN round(km / trips, 2) END
  mileage: fleet_band(km)
"""

HEADER = ["vehicle_id", "make", "fuel", "bought", "price", "trips", "km", "last_trip",
          "services", "faults", "km_per_trip", "mileage", "shard_id", "idempotency_key"]
VEHICLES = 300
SHARDS = 3
MAKES = ("Volvo", "Scania", "MAN", "Iveco")
FUELS = ("Diesel", "petrol", "ELECTRIC")  # categoricals in any case


def _id(i: int) -> str:
    return f"V{i:04d}"


def write_fleet(folder: Path) -> None:
    """The fleet's three files, deterministic: VEHICLES vehicles, one bad trips row (V0005's
    trip count is not a number) and one services row without a key."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {
        "vehicles.csv": [["vehicle_id", "make", "fuel", "bought", "price"]] + [
            [_id(i), MAKES[i % 4], FUELS[i % 3], f"20{10 + i % 12}-0{1 + i % 9}-1{i % 10}",
             f"{20000 + 37 * i}.{i % 100:02d}"] for i in range(1, VEHICLES + 1)],
        # The key need not be the first column.
        "trips.csv": [["trips", "vehicle_id", "km", "last_trip"]] + [
            ["abc" if i == 5 else str(i % 40), _id(i), f"{(i * 13) % 3000}.5",
             f"2026-11-{1 + i % 28:02d}"] for i in range(1, VEHICLES + 1)],
        "services.csv": [["vehicle_id", "services", "faults"]] + [
            [_id(i), str(i % 7), str(i % 3 if i % 7 >= 2 else 0)]
            for i in range(1, VEHICLES + 1)] + [["", "1", "0"]],
    }
    for name, table in rows.items():
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(table)
        (folder / name).write_text(buffer.getvalue(), encoding="utf-8")


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Path, Path]:
    """(the declaration file, the data folder)."""
    declaration = tmp_path / "fleet.yaml"
    declaration.write_text(FLEET, encoding="utf-8")
    data = tmp_path / "fleet_data"
    write_fleet(data)
    return declaration, data


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("SHARD_COUNT", "CHAOS_FAIL_SHARD", "CHAOS_FAIL_MODE", "DATA_DIR", "EXPORT_PATH",
                "ETL_PIPELINE", "DUCKDB_PATH", "STAGING_DIR"):
        env.pop(var, None)
    env.update(DAGSTER_HOME=str(tmp_path / "dagster_home"), ETL_HOME=str(tmp_path / "var"),
               SHARD_RETRY_DELAY_S="0.05", **extra)
    return env


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "etl-assets"), "run", *args], cwd=tmp_path,
                          env=_env(tmp_path, **env), capture_output=True, text=True, timeout=300)


def _events(stdout: str, event: str) -> list[dict]:
    found = []
    for line in stdout.splitlines():
        if line.startswith("{") and f'"event": "{event}"' in line:
            found.append(json.loads(line))
    return found


def _export(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_fleet_runs_with_every_guarantee_beside_the_customers(tmp_path, fleet, sample_dir):
    declaration, data = fleet
    home = tmp_path / "var"
    fleet_args = ("--pipeline", str(declaration), "--data-dir", str(data), "--shards", str(SHARDS))

    first = _run(tmp_path, *fleet_args)
    assert first.returncode == 0, first.stdout + first.stderr
    # Its own folder, its own export; the customer pipeline's default paths stay untouched.
    own = home / "pipelines" / "fleet"
    export = own / "merged_output.csv"
    assert f"export: {export}" in first.stdout
    assert not (home / "warehouse.duckdb").exists() and not (home / "staging").exists()
    assert export.read_text(encoding="utf-8").splitlines()[0] == ",".join(HEADER)
    rows = _export(export)
    assert [r["vehicle_id"] for r in rows] == [_id(i) for i in range(1, VEHICLES + 1)]
    by_id = {r["vehicle_id"]: r for r in rows}
    # V0007: 7 trips, 91.5 km -> 13.07 km a trip, LOW; V0200: 0 trips -> no ratio, 2600.5 km HIGH.
    assert (by_id["V0007"]["trips"], by_id["V0007"]["km"]) == ("7", "91.5")
    assert (by_id["V0007"]["km_per_trip"], by_id["V0007"]["mileage"]) == ("13.07", "LOW")
    assert (by_id["V0200"]["km_per_trip"], by_id["V0200"]["mileage"]) == ("", "HIGH")
    # A category in its declared spelling, whatever case the file used; money exact.
    assert by_id["V0002"]["fuel"] == "Electric" and by_id["V0003"]["price"] == "20111.03"
    # The bad row is quarantined with its reason; the vehicle keeps its other sources' columns.
    assert by_id["V0005"]["trips"] == "" and by_id["V0005"]["make"] == "Scania"
    con = duckdb.connect(str(own / "warehouse.duckdb"), read_only=True)
    try:
        rejected = con.execute("SELECT source, line_number, vehicle_id, reason FROM rejected_rows "
                               "ORDER BY source").fetchall()
        # The merged table is the pipeline's own `profiles`, its export's rows.
        assert con.execute("SELECT count(*), count(DISTINCT vehicle_id) FROM profiles"
                           ).fetchone() == (VEHICLES, VEHICLES)
        assert con.execute("SELECT count(*) FROM duckdb_views() "
                           "WHERE view_name = 'customer_profiles'").fetchone() == (0,)
    finally:
        con.close()
    assert rejected == [("services", VEHICLES + 2, None, "missing_vehicle_id"),
                        ("trips", 6, "V0005", "invalid_integer(trips)")]
    assert "check no_duplicate_vehicle_id" in first.stdout and "FAILED" not in first.stdout

    # Unchanged: every source and shard is skipped, the export is the same bytes.
    before = export.read_bytes()
    again = _run(tmp_path, *fleet_args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(_events(again.stdout, "source_skip")) == 3
    assert len(_events(again.stdout, "shard_skip")) == SHARDS
    assert export.read_bytes() == before

    # The customer pipeline in the same home: its default paths, its sha256, nothing of the
    # fleet's touched.
    customers = _run(tmp_path, "--data-dir", str(sample_dir), "--shards", "4")
    assert customers.returncode == 0, customers.stdout + customers.stderr
    sample_export = home / "merged_output.csv"
    assert hashlib.sha256(sample_export.read_bytes()).hexdigest() == SAMPLE_EXPORT_SHA256
    assert export.read_bytes() == before

    # One trips row edited: only trips is staged again, only its vehicle's shard rebuilt.
    trips = data / "trips.csv"
    text = trips.read_text(encoding="utf-8")
    assert ",V0007,91.5," in text
    trips.write_text(text.replace(",V0007,91.5,", ",V0007,3000.0,"), encoding="utf-8")
    edited = _run(tmp_path, *fleet_args)
    assert edited.returncode == 0, edited.stdout + edited.stderr
    assert {e["source"] for e in _events(edited.stdout, "source_skip")} == {"vehicles", "services"}
    assert len(_events(edited.stdout, "shard_skip")) == SHARDS - 1
    built = _events(edited.stdout, "shard_end")
    assert len(built) == 1
    row = {r["vehicle_id"]: r for r in _export(export)}["V0007"]
    assert (row["km"], row["km_per_trip"], row["mileage"]) == ("3000.0", "428.57", "HIGH")
    assert hashlib.sha256(sample_export.read_bytes()).hexdigest() == SAMPLE_EXPORT_SHA256

    # The chaos drill on the fleet: the shard fails once, Dagster retries it, the export holds.
    shard = built[0]["shard_id"]
    after_edit = export.read_bytes()
    chaos = _run(tmp_path, *fleet_args, CHAOS_FAIL_SHARD=str(shard))
    assert chaos.returncode == 0, chaos.stdout + chaos.stderr
    errors = _events(chaos.stdout, "shard_error")
    assert [(e["shard_id"], e["attempt"]) for e in errors] == [(shard, 1)]
    assert any(e["shard_id"] == shard and e["attempt"] == 2 for e in _events(chaos.stdout,
                                                                            "shard_end"))
    assert export.read_bytes() == after_edit

    # The customers again after the fleet's runs: unchanged, skipped, the same bytes.
    customers_again = _run(tmp_path, "--data-dir", str(sample_dir), "--shards", "4")
    assert customers_again.returncode == 0, customers_again.stdout + customers_again.stderr
    assert len(_events(customers_again.stdout, "shard_skip")) == 4
    assert hashlib.sha256(sample_export.read_bytes()).hexdigest() == SAMPLE_EXPORT_SHA256


def test_a_bad_declaration_is_one_line_exit_2_and_nothing_runs(tmp_path, fleet):
    declaration, data = fleet
    declaration.write_text(FLEET.replace("kind: money", "kind: moneyy"), encoding="utf-8")
    proc = _run(tmp_path, "--pipeline", str(declaration), "--data-dir", str(data))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fleet.yaml:" in lines[0] and "price.kind" in lines[0]
    assert "unknown kind 'moneyy'" in lines[0]
    assert not (tmp_path / "var").exists()
