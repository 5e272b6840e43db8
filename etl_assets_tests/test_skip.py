"""Unchanged work is skipped, judged against the warehouse itself, and --force redoes it."""

import json
import os
import shutil
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import dagster as dg
import pytest

from etl_assets.definitions import build_defs
from etl_assets.defs.contracts import SHARD_INPUTS, SOURCES_JOB
from etl_assets.lib import declaration_file, profile_tables, staging, warehouse
from etl_assets.lib.checks import SOURCE_CUSTOMERS
from etl_assets.lib.events import progress_listener
from etl_assets.lib.freshness import ENGINE_VERSION, guess_shards_needed, staging_key
from etl_assets.lib.profiles import profile_summary
from etl_assets.lib.rules import ENGINE_MACROS
from etl_assets.lib.sharding import shard_of
from etl_assets.tools.runner import run_pipeline
from etl_assets_tests.conftest import REPO, make_settings, read_export, user_tables

# Four shards prove every skip rule as well as ten, at less than half the Dagster runs.
SHARDS = 4


@pytest.fixture
def ran(ran_sample):
    """Settings of a home where the sample has just run on SHARDS shards."""
    return ran_sample(SHARDS)


# Here the sample and the instance are those of the home that ran.
@pytest.fixture
def sample_dir(ran):
    return Path(ran.data_dir)


@pytest.fixture
def instance(ran):
    with dg.DagsterInstance.get() as inst:
        yield inst


def _shard_runs(instance) -> int:
    return len(instance.get_runs(dg.RunsFilter(job_name="shards_job")))


def _sources_runs(instance) -> list[dg.DagsterRun]:
    """The sources job's runs, newest first."""
    return instance.get_runs(dg.RunsFilter(job_name="sources_job"))


def _latest_metadata(instance, name):
    event = instance.get_latest_materialization_event(dg.AssetKey(name))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_unchanged_rerun_skips_then_one_row_rebuilds_one_shard(ran, sample_dir, instance):
    settings = ran
    first_export = Path(settings.export_path).read_bytes()
    assert _shard_runs(instance) == SHARDS

    lines = []
    again = run_pipeline(settings, echo=lines.append)
    assert again.ok, again.reason
    assert all(r.skipped for r in again.shards) and _shard_runs(instance) == SHARDS
    assert sum(r.records for r in again.shards) == 1000
    assert sum('"event": "shard_skip"' in line for line in lines) == SHARDS
    # Unchanged sources get no Dagster run either: one line each says why.
    assert sum('"event": "source_skip"' in line for line in lines) == 4
    assert len(_sources_runs(instance)) == 1
    assert _latest_metadata(instance, "customer_profiles")["skipped"] is True
    assert Path(settings.export_path).read_bytes() == first_export

    # One customer's row changes: that shard (and customer_profiles) is rebuilt, nothing else.
    text = (sample_dir / "billing.csv").read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith("cust_00000077,"))
    fields = line.split(",")
    fields[3] = "12345.67"  # mrr
    (sample_dir / "billing.csv").write_text(text.replace(line, ",".join(fields)), encoding="utf-8")
    steps: list[str] = []
    with progress_listener(lambda stage, fields: steps.append(str(fields.get("step")))):
        changed = run_pipeline(settings, echo=lambda line: None)
    assert changed.ok, changed.reason
    # One shard's table is replaced; the export, merged from the parts (one of them new),
    # holds the bytes of one sorted copy of the table.
    assert f"table: replacing 1 of {SHARDS} shards, while the export is merged from {SHARDS} " \
        "parts" in steps, steps
    whole = Path(settings.home_dir) / "whole.csv"
    with warehouse.reader(settings.database, 5) as con:
        con.sql("SELECT * FROM wh.customer_profiles ORDER BY customer_id").write_csv(
            str(whole), sep=",", header=True)
    assert Path(settings.export_path).read_bytes() == whole.read_bytes() != first_export
    rebuilt = [r.shard_id for r in changed.shards if not r.skipped]
    assert rebuilt == [shard_of("cust_00000077", SHARDS)]
    # The checks' distinct source customers per shard, kept by the staging code and each
    # shard's input hash: what counting each shard's slices now gives, for the current
    # inputs only.
    staged = staging.current_sources(settings)
    memo = json.loads((Path(settings.staging_dir) / SOURCE_CUSTOMERS).read_text())
    with warehouse.scratch() as con:
        assert memo == {
            f"{staging_key(settings)}:{staging.shard_input_hash(staged, k)}": con.execute(
                "SELECT count(DISTINCT customer_id) FROM read_parquet(?)",
                [staging.all_slice_files(staged, [k])]).fetchone()[0] for k in range(SHARDS)}
    assert _latest_metadata(instance, "billing")["skipped"] is False
    # Only the changed source is staged again, with shard_inputs recording the new versions.
    assert _sources_runs(instance)[0].asset_selection == {dg.AssetKey("billing"), SHARD_INPUTS}
    published = _latest_metadata(instance, "customer_profiles")
    assert published["skipped"] is False
    with warehouse.reader(settings.database, 5) as con:
        assert con.execute("SELECT mrr FROM wh.customer_profiles WHERE customer_id = ?",
                           ["cust_00000077"]).fetchone()[0] == Decimal("12345.67")
        # The summary, read inside the publish before it committed, is the committed table's.
        assert published["summary"] == profile_summary(con)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_replaced_warehouse_never_causes_a_wrong_skip(ran, sample_dir, workers):
    settings = ran
    export = Path(settings.export_path).read_bytes()
    # Staged slices survive, the warehouse does not (deleted, or swapped for an empty one).
    Path(settings.database).unlink()
    # With 2 workers the files look unchanged, so the pool is not started ahead: the shards
    # still all run, in workers started when they turn out to be needed.
    assert not guess_shards_needed(settings)
    rerun = run_pipeline(settings, echo=lambda line: None, workers=workers)
    assert rerun.ok, rerun.reason
    assert not any(r.skipped for r in rerun.shards)
    assert sum(r.records for r in rerun.shards) == 1000
    assert Path(settings.export_path).read_bytes() == export


def test_guess_shards_needed_from_files_touched_since_staging(tmp_path, ran, sample_dir):
    never_staged = make_settings(tmp_path, sample_dir, shard_count=SHARDS)
    assert guess_shards_needed(never_staged)
    settings = ran
    assert not guess_shards_needed(settings)
    assert guess_shards_needed(settings.replace(force=True))
    assert guess_shards_needed(settings.replace(shard_count=3))  # staged for 4 shards
    assert guess_shards_needed(settings.replace(chaos_fail_shard=3))
    # A file written after the staging (an edit, a new delivery) makes the workers start early.
    later = time.time() + 5
    os.utime(sample_dir / "support.csv", (later, later))
    assert guess_shards_needed(settings)


def test_force_recomputes_everything(ran, sample_dir, instance):
    settings = ran
    forced = run_pipeline(settings.replace(force=True), echo=lambda line: None)
    assert forced.ok and not any(r.skipped for r in forced.shards)
    assert _shard_runs(instance) == 2 * SHARDS
    assert _latest_metadata(instance, "crm")["skipped"] is False


def test_customer_profiles_skip_is_proven_by_the_export_and_snapshot_themselves(
        ran, sample_dir, instance):
    """An unchanged re-run keeps the export and the snapshot only if they are byte-for-byte the
    ones last written; an edited or deleted export, or a deleted snapshot, is rebuilt, and
    --force always rebuilds."""
    settings = ran
    export = Path(settings.export_path).read_bytes()

    with open(settings.export_path, "ab") as fh:  # someone appends a line to the export
        fh.write(b"cust_99999999,intruder@example.com\n")
    assert run_pipeline(settings, echo=lambda line: None).ok
    assert _latest_metadata(instance, "customer_profiles")["skipped"] is False
    assert Path(settings.export_path).read_bytes() == export

    Path(settings.export_path).unlink()
    assert run_pipeline(settings, echo=lambda line: None).ok
    assert _latest_metadata(instance, "customer_profiles")["skipped"] is False
    assert Path(settings.export_path).read_bytes() == export

    Path(settings.snapshot_path).unlink()  # deleted, or never published
    restored = run_pipeline(settings, echo=lambda line: None)
    assert restored.ok and all(r.skipped for r in restored.shards)
    assert _latest_metadata(instance, "customer_profiles")["skipped"] is False
    assert user_tables(settings.snapshot_path) == user_tables(settings.database)
    assert Path(settings.export_path).read_bytes() == export

    assert run_pipeline(settings, echo=lambda line: None).ok
    assert _latest_metadata(instance, "customer_profiles")["skipped"] is True
    assert run_pipeline(settings.replace(force=True), echo=lambda line: None).ok
    assert _latest_metadata(instance, "customer_profiles")["skipped"] is False


def test_a_rebuild_forgets_the_previous_record_at_once(ran, sample_dir):
    """The record that lets customer_profiles skip is dropped in the rebuild's own transaction,
    so a crash between the rebuild and the export can never leave an old record that matches."""
    settings = ran
    with warehouse.reader(settings.database, 5) as con:
        assert con.execute("SELECT count(*) FROM wh.profiles_manifest").fetchone()[0] == 1
        profile_tables.rebuild_customer_profiles(con, settings.shard_count)
        assert con.execute("SELECT count(*) FROM wh.profiles_manifest").fetchone()[0] == 0


def test_shard_inputs_is_recorded_again_if_a_run_died_after_staging(ran, sample_dir, instance):
    """A source staged without its shard_inputs step (a run that died in between) looks
    unchanged to the next run, which still records shard_inputs so the UI's versions are right."""
    settings = ran
    recorded = instance.get_latest_materialization_event(SHARD_INPUTS).timestamp
    text = (sample_dir / "crm.csv").read_text(encoding="utf-8")
    (sample_dir / "crm.csv").write_text(text.replace("Enterprise", "Lead", 1), encoding="utf-8")
    staged_only = build_defs(settings).resolve_job_def(SOURCES_JOB).execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("crm")])
    assert staged_only.success
    assert instance.get_latest_materialization_event(SHARD_INPUTS).timestamp == recorded

    lines = []
    assert run_pipeline(settings, echo=lines.append).ok
    assert sum('"event": "source_skip"' in line for line in lines) == 4  # crm is staged already
    assert _sources_runs(instance)[0].asset_selection == {SHARD_INPUTS}
    assert instance.get_latest_materialization_event(SHARD_INPUTS).timestamp > recorded


def test_an_edited_declaration_recomputes_every_shard(ran, tmp_path):
    """The declaration's digest is part of the code version (issue 33): the package with one
    derived expression edited, run from the command line on this home, recomputes every shard
    (none is skipped as unchanged) without staging a source again, and its export differs in
    that column alone; the shipped declaration, run again, gives back the first export."""
    settings = ran
    first = Path(settings.export_path).read_bytes()
    before = {row["customer_id"]: row for row in read_export(Path(settings.export_path))}
    edited = tmp_path / "edited"
    shutil.copytree(REPO / "etl_assets", edited / "etl_assets",
                    ignore=shutil.ignore_patterns("__pycache__"))
    declared = edited / "etl_assets" / "customers.yaml"
    score = "health_score: etl_health_score(usage_pct, payment_status, nps_score, open_tickets)"
    text = declared.read_text(encoding="utf-8")
    assert text.count(score) == 1
    declared.write_text(text.replace(score, f"{score} + 1"), encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if k not in ("EXPORT_PATH", "DUCKDB_PATH", "CHAOS_FAIL_SHARD", "CHAOS_FAIL_MODE")}
    env.update(PYTHONPATH=str(edited), ETL_HOME=settings.home_dir, DATA_DIR=settings.data_dir,
               SHARD_COUNT=str(SHARDS))
    # Not from the checkout: `python -m` puts the working folder first on the path.
    proc = subprocess.run([sys.executable, "-m", "etl_assets.tools.cli", "run", "--workers", "1"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count('"event": "source_skip"') == 4
    assert proc.stdout.count('"event": "shard_end"') == SHARDS
    assert '"event": "shard_skip"' not in proc.stdout
    digest = declaration_file.load(declared, ENGINE_MACROS).digest
    with warehouse.read_only(settings.database, 5) as con:
        versions = {e["code_version"] for e in warehouse.read_manifest(con, SHARDS).values()}
    assert versions == {f"{ENGINE_VERSION}-{digest[:16]}"}

    after = {row["customer_id"]: row for row in read_export(Path(settings.export_path))}
    assert after.keys() == before.keys() and len(after) == 1000
    for customer, row in after.items():
        old = before[customer]
        assert int(row.pop("health_score")) == int(old.pop("health_score")) + 1
        # The idempotency key hashes the inputs, which did not change.
        assert row == old

    again = run_pipeline(settings, echo=lambda line: None)
    assert again.ok and not any(r.skipped for r in again.shards)
    assert Path(settings.export_path).read_bytes() == first
