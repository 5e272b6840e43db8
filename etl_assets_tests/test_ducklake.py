"""The DuckLake warehouse (DUCKDB_PATH=ducklake:postgres:...): real PostgreSQL catalogs (one
server for the module, conftest.pg_cluster; a fresh database per lake), real DuckLake.

Concurrent shard writers in separate processes, the compare-and-set that keeps an outdated
shard run from writing, and `etl-assets run` on a Postgres Dagster instance + DuckLake against
the embedded run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

from etl_assets.lib import ducklake, freshness, publish, warehouse
from etl_assets.lib.profiles import build_shard, publish_profiles
from etl_assets.lib.schema import SOURCES
from etl_assets.lib.settings import PG_URL_VAR, EtlSettings, SettingsError
from etl_assets.lib.sharding import shard_of
from etl_assets.lib.sources import stage_source
from etl_assets_tests.conftest import edit_crm, make_settings, new_database, outdated_by_a_newer_run
from etl_assets_tests.test_other_domain import FLEET, VEHICLES, write_fleet

BIN = Path(sys.executable).parent
SHARDS = 10


def new_lake(cluster, data_path: Path) -> dict[str, str]:
    """DUCKDB_PATH and DUCKLAKE_DATA_PATH of a new, empty DuckLake (its own database)."""
    name = new_database(cluster, "lake")
    return {"DUCKDB_PATH": f"ducklake:postgres:dbname={name} host=127.0.0.1 "
                           f"port={cluster.port} user=postgres",
            "DUCKLAKE_DATA_PATH": str(data_path)}


@pytest.fixture
def lake(pg_cluster, tmp_path) -> dict[str, str]:
    return new_lake(pg_cluster, tmp_path / "lake-data")


def _on_lake(tmp_path: Path, data_dir: Path, lake: dict[str, str], **overrides) -> EtlSettings:
    return make_settings(tmp_path, data_dir, database=lake["DUCKDB_PATH"],
                         ducklake_data_path=lake["DUCKLAKE_DATA_PATH"], **overrides)


def _rows(settings: EtlSettings) -> tuple[list[tuple], list[tuple]]:
    """shard_profiles and shard_manifest, sorted (DuckLake keeps no insertion order)."""
    with warehouse.read_only(settings.database, 5) as con:
        return (con.execute("SELECT * FROM wh.shard_profiles "
                            "ORDER BY shard_count, shard_id, customer_id").fetchall(),
                con.execute("SELECT * FROM wh.shard_manifest "
                            "ORDER BY shard_count, shard_id").fetchall())


def test_settings_need_a_data_path_and_no_password(tmp_path, lake):
    assert _on_lake(tmp_path, tmp_path, lake).snapshot_path == \
        str(tmp_path / "var" / "merged_output.snapshot.duckdb")  # beside the export
    with pytest.raises(SettingsError, match="DUCKLAKE_DATA_PATH must be set"):
        EtlSettings.from_env(env={"DUCKDB_PATH": lake["DUCKDB_PATH"]})
    with pytest.raises(SettingsError, match="PGPASSWORD") as caught:
        EtlSettings.from_env(env={**lake, "DUCKDB_PATH": lake["DUCKDB_PATH"] + " password=s3cr"})
    assert "s3cr" not in str(caught.value)
    with pytest.raises(SettingsError, match="key=value form"):
        EtlSettings.from_env(env={**lake, "DUCKDB_PATH": "ducklake:postgres:postgresql://x/y"})


def test_a_lake_never_created_reads_as_no_warehouse(tmp_path, lake):
    settings = _on_lake(tmp_path, tmp_path, lake)
    with warehouse.read_only(settings.database, 5) as con:
        assert con is None
    assert not Path(lake["DUCKLAKE_DATA_PATH"]).exists()  # nothing was created


_WRITER = """
import json, pathlib, sys, time
from etl_assets.lib.profiles import build_shard
from etl_assets.lib.settings import EtlSettings

settings = EtlSettings(**json.loads(sys.argv[1]))
shard, barrier, total = int(sys.argv[2]), pathlib.Path(sys.argv[3]), int(sys.argv[4])
seen = []

def meet_the_others(point):
    # First attempt only: every writer holds an open transaction on the same tables, then all
    # commit at once, so all but one must conflict and retry.
    if point == "shard_before_commit" and not seen:
        seen.append(point)
        (barrier / str(shard)).touch()
        deadline = time.monotonic() + 60
        while len(list(barrier.iterdir())) < total and time.monotonic() < deadline:
            time.sleep(0.01)

print(build_shard(settings, shard, run_id="r", hook=meet_the_others).record_count)
"""


def test_ten_concurrent_shard_writers_give_the_serial_table(tmp_path, sample_dir, lake):
    """Ten processes, one shard each, all committing into one DuckLake table at the same
    moment: every one succeeds (after retrying its conflicts), and the table and manifest are
    exactly what a serial run into a DuckDB file gives."""
    settings = _on_lake(tmp_path, sample_dir, lake, shard_count=SHARDS)
    for schema in SOURCES.values():
        stage_source(schema, settings)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER,
                               json.dumps(settings.field_values()), str(k), str(barrier),
                               str(SHARDS)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in settings.shard_ids]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * SHARDS, [err[-2000:] for _, err in outputs]
    retries = [json.loads(line[line.index("{"):]) for _, err in outputs
               for line in err.splitlines() if '"warehouse_retry"' in line]
    # All ten held their transactions open together: every commit but the first conflicted.
    assert len(retries) >= SHARDS - 1, [err[-1500:] for _, err in outputs]
    assert {r["what"] for r in retries} <= {f"shard {k}" for k in settings.shard_ids}

    serial = settings.replace(database=str(tmp_path / "serial.duckdb"))
    for k in serial.shard_ids:
        build_shard(serial, k, run_id="r")
    lake_rows, lake_manifest = _rows(settings)
    file_rows, file_manifest = _rows(serial)
    assert len(lake_rows) == 1000 and lake_rows == file_rows
    assert lake_manifest == file_manifest
    assert sum(int(out) for out, _ in outputs) == 1000


def test_a_shard_built_from_slices_restaged_meanwhile_is_not_written(tmp_path, sample_dir,
                                                                     lake):
    """DuckLake takes no lock: a newer run of the same shard commits while the older run's
    transaction is open, after the older one judged its slices current. The older run's
    COMMIT conflicts, its retry judges again, and it fails retryably without writing."""
    settings = _on_lake(tmp_path, sample_dir, lake, shard_count=2)
    for schema in SOURCES.values():
        stage_source(schema, settings)
    outdated_by_a_newer_run(settings, sample_dir, "shard_after_delete")


def test_a_shard_written_while_customer_profiles_is_published_makes_it_start_again(
        tmp_path, sample_dir, lake, monkeypatch, caplog):
    """No lock keeps the shards still while customer_profiles is built from them: a shard run
    commits changed rows after the publish judged the shards. The publish sees that its
    snapshot read another shard manifest, starts again, and records what its rows came from
    (without that, it would record the judged shards and the next run would rebuild)."""
    settings = _on_lake(tmp_path, sample_dir, lake, shard_count=2)
    for schema in SOURCES.values():
        stage_source(schema, settings)
    for k in settings.shard_ids:
        build_shard(settings, k, run_id="first")
    check, meanwhile = publish.check_export_target, []
    changed = shard_of("cust_00000007", settings.shard_count)  # the other shard stays current

    def a_shard_commits_meanwhile(path: str) -> None:
        if not meanwhile:  # after the shards were judged, before the snapshot reads them
            edit_crm(sample_dir, {"cust_00000007": 4321})
            stage_source(SOURCES["crm"], settings)
            meanwhile.append(build_shard(settings, changed, run_id="meanwhile"))
        check(path)

    monkeypatch.setattr(publish, "check_export_target", a_shard_commits_meanwhile)
    with caplog.at_level("WARNING", logger=ducklake.__name__):
        published = publish_profiles(settings)
        count, skipped = published.rows, published.skipped
    assert (count, skipped) == (1000, False)
    assert any('"what": "customer_profiles"' in r.getMessage() for r in caplog.records)
    with warehouse.read_only(settings.database, 5) as con:
        # Recorded as built from the shards it was built from: the next run skips it.
        assert freshness.profiles_state(settings, con).current
        assert warehouse.read_manifest(con, 2)[changed]["run_id"] == "meanwhile"
        assert con.execute("SELECT employee_count FROM wh.customer_profiles "
                           "WHERE customer_id = 'cust_00000007'").fetchall() == [(4321,)]


def test_retry_policy_is_bounded_and_retries_only_conflicts():
    policy = ducklake.ConflictRetry(attempts=3, first_wait_s=0.001, max_wait_s=0.002)
    assert all(0.0005 <= policy.wait_s(n) <= 0.002 for n in range(1, 10))
    import duckdb

    calls = []

    def conflicting() -> None:
        calls.append(1)
        raise duckdb.TransactionException(
            "TransactionContext Error: Failed to commit: Failed to commit DuckLake transaction.")

    with pytest.raises(ducklake.CommitConflictError, match="lost 3 commits in a row"):
        ducklake.retry_conflicts(conflicting, "shard 1", policy)
    assert len(calls) == 3

    def other() -> None:
        calls.append(1)
        raise duckdb.TransactionException("cannot rollback - no transaction is active")

    with pytest.raises(duckdb.TransactionException):
        ducklake.retry_conflicts(other, "shard 1", policy)
    assert len(calls) == 4


_SHARD_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(?:\d+\s+)?(\S.*)$")


def _cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "etl-assets"), *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SHARD_COUNT", "CHAOS_FAIL_SHARD", "CHAOS_FAIL_MODE", "DATA_DIR",
                        "EXPORT_PATH", "ETL_FORCE", "DUCKDB_THREADS", "DUCKDB_PATH",
                        "DUCKLAKE_DATA_PATH", PG_URL_VAR)}
    env.update(DAGSTER_HOME=str(home / "dagster_home"), ETL_HOME=str(home / "var"), **extra)
    return env


_RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _decisions(out: str) -> list[str]:
    """What a run printed about each source and shard, without times and run ids."""
    lines = []
    for line in out.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event["event"] in ("source_skip", "shard_skip", "shard_end"):
                lines.append(_RUN_ID.sub("<run>", " ".join(str(event.get(k)) for k in (
                    "event", "source", "shard_id", "record_count", "reason"))))
        elif (row := _SHARD_ROW.match(line)) is not None:  # the shard table, without times
            lines.append("row " + " ".join(row.groups()))
        elif line.startswith(("check ", "total ")):
            lines.append(line)
    return sorted(lines)


@pytest.mark.cli
def test_etl_assets_run_on_postgres_and_ducklake_matches_the_embedded_run(
        tmp_path, pg_cluster, lake):
    """20,000 generated customers through the real CLI, twice each: on the embedded default
    (SQLite instance, DuckDB file) and on a Postgres instance + DuckLake warehouse. Byte-
    identical exports; the runs are in Postgres; the second runs skip the same work."""
    data = tmp_path / "data"
    generate = subprocess.run([str(BIN / "etl-assets"), "generate", "--rows", "20000",
                               "--seed", "7", "--out", str(data)],
                              capture_output=True, text=True, timeout=120)
    assert generate.returncode == 0, generate.stdout + generate.stderr
    dagster_db = new_database(pg_cluster, "dagster")
    pg_url = pg_cluster.url(dagster_db, scheme="postgresql+psycopg2")
    embedded_env = _env(tmp_path / "embedded", DATA_DIR=str(data))
    shared_env = _env(tmp_path / "shared", DATA_DIR=str(data), DAGSTER_PG_URL=pg_url, **lake)
    command = ("run", "--shards", "4", "--workers", "2")
    outs: dict[str, list[str]] = {"embedded": [], "shared": []}
    for _ in range(2):  # the two homes side by side: same load on both
        procs = {"embedded": _cli(embedded_env, tmp_path, *command),
                 "shared": _cli(shared_env, tmp_path, *command)}
        for name, proc in procs.items():
            out = proc.communicate(timeout=300)[0]
            assert proc.returncode == 0, (name, out[-3000:])
            outs[name].append(out)
    embedded_export = tmp_path / "embedded" / "var" / "merged_output.csv"
    shared_export = tmp_path / "shared" / "var" / "merged_output.csv"
    assert shared_export.read_bytes() == embedded_export.read_bytes()
    assert len(shared_export.read_bytes().splitlines()) == 20001
    # Every decision the same, and the second run skipped the sources and shards.
    assert _decisions(outs["shared"][0]) == _decisions(outs["embedded"][0])
    assert _decisions(outs["shared"][1]) == _decisions(outs["embedded"][1])
    assert outs["shared"][1].count('"event": "source_skip"') == 4
    assert outs["shared"][1].count('"event": "shard_skip"') == 4
    with psycopg2.connect(pg_url.replace("+psycopg2", "")) as con, con.cursor() as cur:
        cur.execute("SELECT pipeline_name, status FROM runs ORDER BY id")
        runs = cur.fetchall()
    assert {status for _, status in runs} == {"SUCCESS"}
    assert [job for job, _ in runs].count("shards_job") == 4
    assert not (tmp_path / "shared" / "var" / "warehouse.duckdb").exists()
    assert (tmp_path / "shared" / "var" / "merged_output.snapshot.duckdb").is_file()

    # Another domain (issue 33's fleet) on the same deployment: given the customers' lake it
    # stops in one line before writing; on a lake of its own, its export, bad row quarantined,
    # is the embedded run's, byte for byte.
    (tmp_path / "fleet.yaml").write_text(FLEET, encoding="utf-8")
    write_fleet(tmp_path / "fleet_data")
    fleet = ("run", "--pipeline", str(tmp_path / "fleet.yaml"), "--data-dir",
             str(tmp_path / "fleet_data"), "--shards", "3")
    refused = _cli(shared_env, tmp_path, *fleet)
    out = refused.communicate(timeout=300)[0]
    assert refused.returncode == 1 and out.strip().splitlines()[-1].endswith(
        "holds the tables of pipeline 'customers', not of pipeline 'fleet': give each pipeline "
        "its own (without DUCKDB_PATH, 'fleet' has them under <home>/pipelines/fleet/)"), out
    shared_env.update(new_lake(pg_cluster, tmp_path / "fleet-lake"))
    procs = {"embedded": _cli(embedded_env, tmp_path, *fleet),
             "shared": _cli(shared_env, tmp_path, *fleet)}
    for name, proc in procs.items():
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, (name, out[-3000:])
    exports = [tmp_path / home / "var" / "pipelines" / "fleet" / "merged_output.csv"
               for home in ("embedded", "shared")]
    assert exports[0].read_bytes() == exports[1].read_bytes()
    assert len(exports[1].read_bytes().splitlines()) == VEHICLES + 1
    with warehouse.read_only(shared_env["DUCKDB_PATH"], 5) as con:
        assert con.execute("SELECT source, reason FROM wh.rejected_rows ORDER BY source"
                           ).fetchall() == [("services", "missing_vehicle_id"),
                                            ("trips", "invalid_integer(trips)")]


def test_an_unreachable_catalog_is_one_line_without_the_password(tmp_path):
    path = "ducklake:postgres:dbname=x host=127.0.0.1 port=1 user=postgres"
    with warehouse.scratch() as con, \
            pytest.raises(warehouse.WarehouseUnreachableError) as caught, \
            warehouse.attached(con, path, 5, str(tmp_path / "data")):
        pass
    message = str(caught.value)
    assert message.startswith(f"{path}: cannot attach the DuckLake catalog") and "\n" not in message
    assert ducklake.redact(f"{path} password='a b' sslmode=require") == \
        f"{path} password=*** sslmode=require"
