"""The Dagster instance etl-assets sets up: SQLite or PostgreSQL (DAGSTER_PG_URL), the run queue
and its limits, the DuckDB threads a queued run gets, and the tag saying who launched a run.

The PostgreSQL tests use a real server of their own (conftest.pg_cluster), a fresh database
each."""

import os
import queue
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import psycopg2
import pytest

from etl_assets.definitions import build_defs
from etl_assets.defs.contracts import (
    LAUNCHED_BY_CLI,
    LAUNCHED_BY_TAG,
    LAUNCHED_BY_UI,
    PARTITION_TAG,
    SHARD_PROFILES,
    launched_by,
)
from etl_assets.defs.resources import resources_for
from etl_assets.lib import limits
from etl_assets.lib.settings import PG_URL_VAR, EtlSettings
from etl_assets.tools.cli import main
from etl_assets.tools.instance import (
    LEGACY_YAML,
    MARKER,
    EtlRunCoordinator,
    instance_yaml,
    write_instance_config,
)
from etl_assets.tools.runner import run_pipeline
from etl_assets_tests.conftest import make_settings

BIN = Path(sys.executable).parent
SECRET = "not-a-real-secret"  # trust authentication ignores it; it must never reach a file


@pytest.fixture
def home_env(tmp_path, monkeypatch):
    """DAGSTER_HOME and ETL_HOME under tmp_path, DAGSTER_PG_URL unset; the Dagster home."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("ETL_HOME", str(tmp_path / "var"))
    monkeypatch.delenv(PG_URL_VAR, raising=False)
    monkeypatch.delenv("DUCKDB_MEMORY_LIMIT", raising=False)
    return tmp_path / "dagster_home"


def _queue(instance: dg.DagsterInstance):
    assert isinstance(instance.run_coordinator, EtlRunCoordinator)
    assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
    return instance.get_concurrency_config().run_queue_config


def _assert_machine_limits(instance: dg.DagsterInstance) -> None:
    queue = _queue(instance)
    assert queue.max_concurrent_runs == limits.run_slots(limits.cores(), limits.ram_bytes(),
                                                         limits.DEFAULT_MEMORY_LIMIT)
    assert 1 <= queue.max_concurrent_runs <= limits.cores()
    assert queue.tag_concurrency_limits == [
        {"key": PARTITION_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]


def test_home_without_pg_url_is_sqlite_with_the_run_queue(home_env):
    assert main(["home"]) == 0
    with dg.DagsterInstance.get() as instance:
        _assert_machine_limits(instance)
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        # Every run's events in one database (not Dagster's default of one per run).
        assert type(instance.event_log_storage).__name__ == "ConsolidatedSqliteEventLogStorage"
    assert (home_env / "history" / "runs.db").is_file()
    assert (home_env / "history" / "events" / "event_log.db").is_file()
    assert (home_env / "dagster.yaml").read_text().startswith(MARKER)


def _store_and_read(instance: dg.DagsterInstance, message: str,
                    run_id: str | None = None) -> list[str]:
    """Store one event of `run_id` (a new run by default); that run's messages, read back."""
    run_id = run_id or str(uuid.uuid4())
    instance.event_log_storage.store_event(dg.EventLogEntry(
        error_info=None, level="INFO", user_message=message, run_id=run_id,
        timestamp=time.time()))
    return [e.user_message for e in instance.all_logs(run_id)]


def test_each_stored_event_reaches_dagsters_file_watcher(home_env):
    """The UI streams a run's events through Dagster's watcher on the events' file: each event
    reaches it once stored, not when the run ends."""
    assert main(["home"]) == 0
    seen: queue.Queue = queue.Queue()
    with dg.DagsterInstance.get() as instance:
        run_id = str(uuid.uuid4())
        instance.event_log_storage.watch(run_id, None,
                                         lambda entry, cursor: seen.put(entry.user_message))
        for n in range(3):
            read = _store_and_read(instance, f"event {n}", run_id)
            assert seen.get(timeout=10) == f"event {n}"
        assert read == [f"event {n}" for n in range(3)]


def test_a_home_path_with_any_character_reaches_dagster_whole(tmp_path, monkeypatch, home_env):
    # Quotes, a YAML comment sign and a character past U+FFFF (JSON writes that one as two
    # surrogates, which YAML reads back as two broken characters).
    home = tmp_path / 'home "q" #: 😀'
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert main(["home"]) == 0
    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        assert Path(storage.get_db_path()) == home.resolve() / "history" / "events" / "event_log.db"
        assert _store_and_read(instance, "kept") == ["kept"]


def test_the_queue_follows_cores_and_memory():
    gb = 1000 ** 3
    assert limits.run_slots(2, 24 * gb, "2GB") == 2
    assert limits.run_slots(16, 24 * gb, "2GB") == 6  # 6 x 2 GB is half of 24 GB
    assert limits.run_slots(8, 3 * gb, "2GB") == 1  # never below one
    assert limits.run_slots(4, 0, "512MiB") == 4  # memory unknown: cores
    assert limits.memory_bytes("512MiB") == 512 * 1024 ** 2
    assert [limits.threads_per_run(2, s) for s in (1, 2, 3, -1)] == [2, 1, 1, 1]
    assert limits.threads_per_run(8, 2) == 4


def test_own_files_are_rewritten_a_users_file_is_kept(tmp_path):
    settings = EtlSettings.from_env(env={}, home_dir=str(tmp_path / "var"))
    config = tmp_path / "dagster.yaml"
    config.write_text(LEGACY_YAML)  # what etl-assets wrote before
    assert write_instance_config(tmp_path, settings, None)
    assert config.read_text() == instance_yaml(settings, False, limits.cores(), limits.ram_bytes(),
                                               home=tmp_path)
    assert not write_instance_config(tmp_path, settings, None)  # current: left as it is

    url = "postgresql+psycopg2://etl@db.example:5432/dagster"
    assert write_instance_config(tmp_path, settings, url)  # now Postgres
    assert "env: DAGSTER_PG_URL" in config.read_text() and "db.example" not in config.read_text()

    mine = "telemetry:\n  enabled: false\n"
    config.write_text(mine)
    assert not write_instance_config(tmp_path, settings, None) and config.read_text() == mine
    with pytest.raises(Exception, match="DAGSTER_PG_URL is set, but this dagster.yaml"):
        write_instance_config(tmp_path, settings, url)  # it would keep the runs in SQLite
    assert config.read_text() == mine


def test_a_bare_postgresql_url_is_refused_without_echoing_it(home_env, monkeypatch, capsys):
    monkeypatch.setenv(PG_URL_VAR, f"postgresql://etl:{SECRET}@127.0.0.1:1/dagster")
    assert main(["home"]) == 2
    err = capsys.readouterr().err
    assert "DAGSTER_PG_URL must start with postgresql+psycopg2://" in err and SECRET not in err
    assert not (home_env / "dagster.yaml").exists()


def test_home_with_pg_url_stores_runs_events_and_schedules_in_postgres(
        home_env, pg_url, monkeypatch):
    from dagster_postgres import (
        PostgresEventLogStorage,
        PostgresRunStorage,
        PostgresScheduleStorage,
    )

    url = pg_url.replace("://postgres@", f"://postgres:{SECRET}@")
    monkeypatch.setenv(PG_URL_VAR, url)
    assert main(["home"]) == 0
    with dg.DagsterInstance.get() as instance:
        _assert_machine_limits(instance)
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)

        @dg.asset
        def probe() -> None:
            pass

        run_id = dg.materialize([probe], instance=instance).run_id
    with psycopg2.connect(pg_url.replace("+psycopg2", "")) as con, con.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
        assert cur.fetchall() == [("SUCCESS",)]
        cur.execute("SELECT count(*) FROM event_logs WHERE run_id = %s", (run_id,))
        assert cur.fetchone()[0] > 0
    # The URL (and its password) stays in the environment: nothing in the home holds it.
    assert "env: DAGSTER_PG_URL" in (home_env / "dagster.yaml").read_text()
    assert not list(home_env.joinpath("history").glob("*.db"))  # no SQLite beside it
    for path in home_env.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SHARD_COUNT", "CHAOS_FAIL_SHARD", "CHAOS_FAIL_MODE", "DATA_DIR",
                        "EXPORT_PATH", "ETL_FORCE", "DUCKDB_THREADS", PG_URL_VAR)}
    env.update(DAGSTER_HOME=str(tmp_path / "dagster_home"), ETL_HOME=str(tmp_path / "var"),
               **extra)
    return env


@pytest.mark.cli
def test_concurrent_first_opens_of_a_fresh_database_create_the_schema_once(tmp_path, pg_url):
    """Three homes opened on one empty database at the same moment: each exits 0, and under the
    schema lock none collides with another's table creation (which Dagster would only retry a
    few times, each with a warning; without the lock, about every other try here)."""
    procs = [subprocess.Popen([str(BIN / "etl-assets"), "home"],
                              env=_env(tmp_path / f"h{k}", DAGSTER_PG_URL=pg_url),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in range(3)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert not any("Retrying failed database creation" in o for o in outputs), outputs
    with psycopg2.connect(pg_url.replace("+psycopg2", "")) as con, con.cursor() as cur:
        cur.execute("SELECT count(*) FROM alembic_version")
        assert cur.fetchone()[0] == 1
        cur.execute("SELECT count(*) FROM runs")
        assert cur.fetchone()[0] == 0


def _pg_runs(url: str) -> list[tuple[str, str, str]]:
    """(job, status, etl/launched_by) of every run the database holds, oldest first."""
    with psycopg2.connect(url.replace("+psycopg2", "")) as con, con.cursor() as cur:
        cur.execute("SELECT r.pipeline_name, r.status, t.value FROM runs r LEFT JOIN run_tags t "
                    "ON t.run_id = r.run_id AND t.key = %s ORDER BY r.id", (LAUNCHED_BY_TAG,))
        return cur.fetchall()


@pytest.mark.cli
def test_etl_assets_run_on_postgres_matches_an_embedded_run(tmp_path, sample_dir, pg_url,
                                                            instance):
    """`etl-assets run` with DAGSTER_PG_URL: its runs are in Postgres, tagged cli; a second
    run skips the unchanged work; the export is byte-identical to a run on a SQLite instance."""
    env = _env(tmp_path / "pg", DATA_DIR=str(sample_dir), DAGSTER_PG_URL=pg_url)
    command = [str(BIN / "etl-assets"), "run", "--shards", "2", "--workers", "1"]
    first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    # Meanwhile, the same data on the embedded instance (SQLite, the `instance` fixture).
    embedded = make_settings(tmp_path / "embedded", sample_dir, shard_count=2)
    assert type(instance.run_storage).__name__ == "SqliteRunStorage"
    assert run_pipeline(embedded, echo=lambda line: None, instance=instance).ok
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out[-3000:]
    runs = _pg_runs(pg_url)
    assert [job for job, _, _ in runs] == ["sources_job", "shards_job", "shards_job",
                                           "profiles_job"]
    assert {(status, origin) for _, status, origin in runs} == {("SUCCESS", LAUNCHED_BY_CLI)}

    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr
    assert again.stdout.count('"event": "source_skip"') == 4
    assert again.stdout.count('"event": "shard_skip"') == 2
    assert [job for job, _, _ in _pg_runs(pg_url)[len(runs):]] == ["profiles_job"]  # no shard
    export = tmp_path / "pg" / "var" / "merged_output.csv"
    assert export.read_bytes() == Path(embedded.export_path).read_bytes()
    assert not (tmp_path / "pg" / "dagster_home" / "history").exists()  # no SQLite runs


def test_runs_of_etl_assets_run_are_tagged_cli(ran_sample):
    ran_sample(4)
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
    assert len(runs) == 6  # sources, 4 shards, customer_profiles
    assert {run.tags.get(LAUNCHED_BY_TAG) for run in runs} == {LAUNCHED_BY_CLI}


def test_who_launched_a_run_from_dagsters_tags():
    assert launched_by({"dagster/backfill": "b1", "dagster/partition": "3"}) == "backfill"
    assert launched_by({"dagster/sensor_name": "s"}) == "sensor:s"
    assert launched_by({"dagster/schedule_name": "daily"}) == "schedule:daily"
    assert launched_by({}) == LAUNCHED_BY_UI
    assert launched_by({LAUNCHED_BY_TAG: "sensor:s", "dagster/sensor_name": "s"}) == "sensor:s"
    # A re-execution from the UI copies its parent's tags: the parent's origin is not its own.
    assert launched_by({LAUNCHED_BY_TAG: LAUNCHED_BY_CLI,
                        "dagster/parent_run_id": "abc"}) == LAUNCHED_BY_UI


@pytest.mark.cli
def test_a_run_submitted_to_the_queue_records_who_launched_it(tmp_path, home_env):
    """`dagster job launch` submits through the instance's run coordinator, as the UI does: the
    run is queued (the daemon would launch it) and carries etl/launched_by."""
    assert main(["home"]) == 0
    env = _env(tmp_path)
    launch = subprocess.run([str(BIN / "dagster"), "job", "launch", "-m",
                             "etl_assets.definitions", "-j", "sources_job"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert launch.returncode == 0, launch.stdout + launch.stderr
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        [run] = instance.get_runs()
    assert run.status == dg.DagsterRunStatus.QUEUED
    assert run.tags[LAUNCHED_BY_TAG] == LAUNCHED_BY_UI


def _threads_used(instance: dg.DagsterInstance, settings: EtlSettings, tags: dict) -> int:
    """Build shard 0 (forced, so it does real work) with these run tags; the DuckDB threads
    its materialization records."""
    defs = build_defs(settings)
    result = dg.materialize(list(defs.assets), selection=[SHARD_PROFILES], partition_key="0",
                            resources=resources_for(settings.replace(force=True)),
                            instance=instance, tags=tags)
    [event] = result.asset_materializations_for_node("shard_profiles")
    return event.metadata["duckdb_threads"].value


def test_a_queued_run_gets_its_share_of_the_cores(ran_sample, tmp_path):
    """A run the queue launched gets cores / max_concurrent_runs DuckDB threads; `etl-assets
    run`'s own runs keep its split; DUCKDB_THREADS wins over both."""
    settings = ran_sample(4)
    n = limits.cores()
    for slots in (1, 2):  # a queue of one run gives it every core; of two, half each
        home = tmp_path / f"queue{slots}"
        home.mkdir()
        (home / "dagster.yaml").write_text(instance_yaml(settings, False, slots, 0))
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert _queue(instance).max_concurrent_runs == slots
            assert _threads_used(instance, settings, {LAUNCHED_BY_TAG: LAUNCHED_BY_UI}) == \
                limits.threads_per_run(n, slots)
            if slots == 2:
                assert _threads_used(instance, settings, {LAUNCHED_BY_TAG: LAUNCHED_BY_CLI}) == 0
                assert _threads_used(instance, settings.replace(threads=3), {}) == 3
    assert limits.threads_per_run(n, 1) == n

