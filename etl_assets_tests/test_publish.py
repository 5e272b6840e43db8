"""Publish all or nothing, and a full disk named: real runs that fail while writing.

Each case runs the pipeline once for real, changes a source so customer_profiles must be
rebuilt, makes the rebuild fail (a bad export path, a fault point raising ENOSPC inside a write,
a real tmpfs that fills up), and checks that table, manifest, export and snapshot are
byte-identical to before, that no temp file or lock stays behind, and that the next good run
heals.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from etl_assets.lib.errors import NO_SPACE
from etl_assets.lib.faults import ENOSPC_POINTS
from etl_assets.lib.files import file_sha256
from etl_assets.lib.settings import EtlSettings
from etl_assets.tools.generate import generate
from etl_assets.tools.runner import run_pipeline
from etl_assets_tests.conftest import edit_crm, make_settings, tmpfs, user_tables

pytestmark = pytest.mark.usefixtures("dagster_home")

CHANGE = {"cust_00000007": 4321}  # one CRM value: one shard and customer_profiles must rebuild
# Two shards: every publish and full-disk rule holds at any shard count.
SHARDS = 2
# What one publish changes together or not at all.
PUBLISHED = ("table", "manifest", "export", "snapshot")


def _quiet(settings: EtlSettings, **kwargs):
    return run_pipeline(settings, echo=lambda line: None, **kwargs)


def state_of(settings: EtlSettings) -> dict[str, object]:
    """Everything a publish may change, as bytes and rows (read-only, takes no write lock)."""
    con = duckdb.connect(settings.database, read_only=True)
    try:
        state = {
            "table": con.execute("SELECT * FROM customer_profiles ORDER BY customer_id").fetchall(),
            "manifest": con.execute("SELECT * FROM profiles_manifest ORDER BY ALL").fetchall(),
            "shards": con.execute(
                "SELECT * FROM shard_profiles ORDER BY shard_id, customer_id").fetchall(),
        }
    finally:
        con.close()
    state["export"] = Path(settings.export_path).read_bytes()
    # Bytes, not rows: a failed publish must not even open it (a reader may hold it).
    state["snapshot"] = Path(settings.snapshot_path).read_bytes()
    return state


def leftovers(settings: EtlSettings, *extra: Path) -> list[Path]:
    """Temp files and folders a failed write must not leave: export, snapshot (and its WAL),
    staging, spill."""
    export, snap = Path(settings.export_path), Path(settings.snapshot_path)
    found = list(export.parent.glob(f".{export.name}.*.tmp"))
    found += list(snap.parent.glob(f".{snap.name}.*.tmp*"))
    found += list(Path(settings.staging_dir).glob("*/.tmp-*"))
    found += list((Path(settings.home_dir) / "duckdb_tmp").glob("spill-*"))
    for folder in extra:
        found += [p for p in folder.glob(".*") if p.name.endswith(".tmp")]
    return found


def assert_not_locked(settings: EtlSettings) -> None:
    """A read-write open succeeds at once: no transaction or lock was left behind."""
    duckdb.connect(settings.database).close()


@pytest.fixture
def published(ran_sample) -> tuple[EtlSettings, dict[str, object]]:
    """A home with one good run, then the CRM change that the next run must publish."""
    settings = ran_sample(SHARDS)
    before = state_of(settings)
    edit_crm(Path(settings.data_dir), CHANGE)
    return settings, before


@pytest.fixture(scope="module")
def changed_export(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The export an undisturbed run makes of the changed sample."""
    from etl_assets_tests.conftest import SAMPLE

    root = tmp_path_factory.mktemp("reference")
    data = root / "data"
    shutil.copytree(SAMPLE, data)
    edit_crm(data, CHANGE)
    settings = make_settings(root, data, shard_count=SHARDS)
    with dg.DagsterInstance.ephemeral() as instance:
        assert run_pipeline(settings, echo=lambda line: None, instance=instance).ok
    return Path(settings.export_path).read_bytes()


def _heals(settings: EtlSettings, changed_export: bytes) -> None:
    healed = _quiet(settings)
    assert healed.ok, healed.reason
    assert Path(settings.export_path).read_bytes() == changed_export
    assert user_tables(settings.snapshot_path) == user_tables(settings.database)
    assert leftovers(settings) == []


@pytest.mark.parametrize("case", ["directory", "parent_is_a_file"])
def test_an_export_that_cannot_be_written_changes_nothing(published, tmp_path, case,
                                                          changed_export):
    settings, before = published
    if case == "directory":
        bad = tmp_path / "out_dir"
        bad.mkdir()
        problem = f"{bad}: is a directory"
    else:
        (tmp_path / "a_file").write_text("not a folder\n")
        bad = tmp_path / "a_file" / "out.csv"
        problem = f"{bad}: parent is not a directory"
    outcome = _quiet(settings.replace(export_path=str(bad)))
    assert not outcome.ok
    assert outcome.reason == problem
    # Shards were rebuilt (they are not the publish), but customer_profiles is as it was.
    after = state_of(settings)
    assert {k: after[k] for k in PUBLISHED} == {k: before[k] for k in PUBLISHED}
    assert leftovers(settings) == []
    assert_not_locked(settings)
    _heals(settings, changed_export)


def _fault_path(settings: EtlSettings, point: str) -> str:
    return {
        "source_before_publish": str(Path(settings.staging_dir) / "crm"),
        "source_rejected_write": settings.database,
        "shard_before_commit": settings.database,
        "export_write": settings.export_path,
        "snapshot_write": settings.snapshot_path,
    }[point]


@pytest.mark.parametrize("point", [p for p in ENOSPC_POINTS if p != "dagster_home_write"])
def test_enospc_inside_each_write_is_named_and_the_next_run_heals(published, point,
                                                                  changed_export):
    settings, before = published
    outcome = _quiet(settings.replace(crash_at=point, crash_mode="enospc"))
    assert not outcome.ok
    assert outcome.reason == f"{_fault_path(settings, point)}: {NO_SPACE}"
    # Not retried: a full disk is not fixed by waiting a second.
    assert all(row.attempts <= 1 for row in outcome.shards)
    after = state_of(settings)
    assert {k: after[k] for k in PUBLISHED} == {k: before[k] for k in PUBLISHED}
    if point not in ("export_write", "snapshot_write"):
        assert after["shards"] == before["shards"]  # the failed write was the shard's or earlier
    assert leftovers(settings) == []
    assert_not_locked(settings)
    _heals(settings, changed_export)


def _remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def test_a_real_full_disk_under_the_warehouse_is_named_then_heals(tmp_path):
    """20,000 customers, the warehouse on a 3 MB tmpfs (it needs about 6 MB)."""
    data = tmp_path / "data"
    generate(20_000, seed=7, out_dir=data)
    reference = make_settings(tmp_path / "ref", data, shard_count=SHARDS)
    with dg.DagsterInstance.ephemeral() as instance:
        assert run_pipeline(reference, echo=lambda line: None, instance=instance).ok
    with tmpfs(tmp_path / "small", "3m") as small:
        settings = make_settings(tmp_path / "home", data, shard_count=SHARDS,
                                 database=str(small / "warehouse.duckdb"))
        outcome = _quiet(settings)
        assert not outcome.ok
        assert outcome.reason == f"{settings.database}: {NO_SPACE}"
        assert all(row.attempts <= 1 for row in outcome.shards)
        assert leftovers(settings) == []
        _remount(small, "64m")  # space freed: no manual step before the next run
        healed = _quiet(settings)
        assert healed.ok, healed.reason
        assert Path(settings.export_path).read_bytes() == \
            Path(reference.export_path).read_bytes()


def test_a_real_full_disk_under_the_export_changes_nothing_then_heals(published, tmp_path,
                                                                      changed_export):
    """The export (about 200 KB) on a 64 KB tmpfs: DuckDB's own write hits ENOSPC."""
    settings, _ = published
    with tmpfs(tmp_path / "tiny", "64k") as tiny:
        target = tiny / "merged_output.csv"
        target.write_bytes(b"old export\n")
        moved = settings.replace(export_path=str(target))
        outcome = _quiet(moved)
        assert not outcome.ok
        assert outcome.reason == f"{target}: {NO_SPACE}"
        assert target.read_bytes() == b"old export\n"
        assert leftovers(moved, tiny) == []
        _remount(tiny, "8m")
        healed = _quiet(moved)
        assert healed.ok, healed.reason
        assert target.read_bytes() == changed_export


def test_a_failed_check_publishes_nothing(published, changed_export):
    """Write, audit, publish: the merge_duplicate fault makes the merge write one customer
    twice, the blocking checks fail on the staged table and export inside a real Dagster run,
    and the run fails with one line while table, manifest, export and snapshot stay as before."""
    settings, before = published
    with dg.DagsterInstance.ephemeral() as instance:
        outcome = _quiet(settings.replace(crash_at="merge_duplicate"), instance=instance)
        assert not outcome.ok
        assert outcome.reason.startswith(
            "customer_profiles failed its checks: row_count_matches_sources"), outcome.reason
        assert "no_duplicate_customer_id (1 duplicate customer_id row(s))" in outcome.reason
        assert outcome.reason.endswith("(table, export and snapshot left as they were)")
        assert "\n" not in outcome.reason
        checks = {name: passed for name, passed, _ in outcome.checks if "." not in name}
        # The duplicate is the table's alone: the export, merged from the snapshot, differs.
        assert checks == {"row_count_matches_sources": False, "no_duplicate_customer_id": False,
                          "idempotency_keys_unique": False, "shards_current": True,
                          "export_matches_table": False}
        # What the UI reads: the run failed and each check's latest execution says so.
        run = instance.get_run_by_id(outcome.run_ids[-1])
        assert run.job_name == "profiles_job" and run.status == dg.DagsterRunStatus.FAILURE
        keys = [dg.AssetCheckKey(dg.AssetKey("customer_profiles"), name) for name in checks]
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
        assert {k.name: r.status.value for k, r in latest.items()} == {
            name: "SUCCEEDED" if passed else "FAILED" for name, passed in checks.items()}
    after = state_of(settings)
    assert {k: after[k] for k in PUBLISHED} == {k: before[k] for k in PUBLISHED}
    assert leftovers(settings) == []
    assert_not_locked(settings)
    _heals(settings, changed_export)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_damaged_export_part_is_rebuilt_from_the_table(ran_sample, caplog):
    """Issue 31, finding b: one changed byte in a kept export part fails the part's recorded
    sha256 as the part is merged; the part is written again from the table and the export is
    the right one, with one warning line naming the part."""
    settings = ran_sample(SHARDS)
    export = Path(settings.export_path)
    expected = export.read_bytes()
    parts = sorted((Path(settings.home_dir) / "export_parts").glob("*.csv"))
    part = next(p for p in parts if b",Active," in p.read_bytes())
    part.write_bytes(part.read_bytes().replace(b",Active,", b",Failed,", 1))
    export.unlink()  # the next publish merges every part
    with caplog.at_level(logging.WARNING):
        outcome = _quiet(settings)
    assert outcome.ok, outcome.reason
    assert export.read_bytes() == expected
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and warnings[0].startswith(f"{part}:"), warnings


# A read-write connection to the snapshot that dies before its checkpoint: its change stays in
# the WAL beside the file.
_DIES_BEFORE_CHECKPOINT = """import duckdb, os, sys
con = duckdb.connect(sys.argv[1])
con.execute("UPDATE customer_profiles_shard_0 SET churn_risk = 'EDITED'")
os._exit(0)
"""


def test_a_wal_beside_the_snapshot_is_never_kept(ran_sample, caplog):
    """Issue 31, finding c: the snapshot's sha256 still matches its manifest, but a WAL beside
    it changes what every reader sees: the next plain run publishes the snapshot again (one
    warning line), and no WAL is left."""
    settings = ran_sample(SHARDS)
    snapshot = Path(settings.snapshot_path)
    published = user_tables(snapshot)
    sha = file_sha256(snapshot)
    subprocess.run([sys.executable, "-c", _DIES_BEFORE_CHECKPOINT, str(snapshot)], check=True)
    wal = snapshot.with_name(snapshot.name + ".wal")
    assert wal.is_file() and file_sha256(snapshot) == sha
    assert user_tables(snapshot) != published
    with caplog.at_level(logging.WARNING):
        outcome = _quiet(settings)
    assert outcome.ok, outcome.reason
    assert not wal.exists()
    assert user_tables(snapshot) == published == user_tables(settings.database)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and warnings[0].startswith(f"{snapshot}:"), warnings
