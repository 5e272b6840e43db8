"""Staging by shard: the slice hashes written with the files agree with the sensor's plan."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from etl_assets.lib import staging
from etl_assets.lib.schema import SOURCES
from etl_assets.lib.sources import plan_slices, stage_source
from etl_assets_tests.conftest import make_settings, write_csv


@pytest.mark.parametrize("shards", [4, 10])
def test_staged_hashes_match_the_plan_for_every_source(tmp_path: Path, sample_dir: Path, shards):
    settings = make_settings(tmp_path, sample_dir, shard_count=shards)
    for name, schema in SOURCES.items():
        result = stage_source(schema, settings)
        sha, planned = plan_slices(schema, settings)
        assert sha == result.staged.file_sha256
        # The sensor decides which shards a changed file touches by comparing these.
        assert planned == result.staged.slice_hashes, name
        assert sum(result.staged.slice_rows.values()) == result.report.accepted
        for k in range(shards):
            rows = duckdb.connect().execute("SELECT count(*) FROM read_parquet(?)",
                                            [result.staged.slice_files(k)]).fetchone()[0]
            assert rows == result.staged.slice_rows[k]


def test_empty_shards_get_a_readable_empty_slice_with_the_plans_hash(tmp_path: Path):
    data = tmp_path / "data"
    schema = SOURCES["support"]
    write_csv(data / schema.filename, schema.column_names,
              [["cust_1", "a@x.example", 3, 1, 2.5, "2025-01-01", 9, 4.5]])
    settings = make_settings(tmp_path, data, shard_count=8)
    result = stage_source(schema, settings)
    _, planned = plan_slices(schema, settings)
    assert planned == result.staged.slice_hashes
    assert sorted(result.staged.slice_rows.values()) == [0] * 7 + [1]
    empty = [k for k, n in result.staged.slice_rows.items() if n == 0]
    assert len({result.staged.slice_hashes[k] for k in empty}) == 1
    for k in empty:
        con = duckdb.connect()
        rel = con.read_parquet(result.staged.slice_files(k))
        assert rel.fetchall() == [] and "row_hash" in rel.columns
    assert staging.read_pointer(settings.staging_dir, "support").slice_rows == result.staged.slice_rows


def test_a_source_with_no_valid_row_stages_empty_slices_for_every_shard(tmp_path: Path):
    data = tmp_path / "data"
    schema = SOURCES["support"]
    write_csv(data / schema.filename, schema.column_names,
              [["cust_1", "a@x.example", 3, 1, 2.5, "2025-01-01", 42, 4.5],  # nps out of range
               ["cust_2", "b@x.example", "many", 1, 2.5, "2025-01-01", 9, 4.5]])
    settings = make_settings(tmp_path, data, shard_count=3, max_reject_fraction=1.0)
    result = stage_source(schema, settings)
    assert result.report.rejected == 2 and result.staged.slice_rows == {0: 0, 1: 0, 2: 0}
    assert plan_slices(schema, settings)[1] == result.staged.slice_hashes
    for k in range(3):
        assert duckdb.connect().read_parquet(result.staged.slice_files(k)).fetchall() == []


def test_staging_read_from_another_mount_point_finds_its_own_files(tmp_path: Path,
                                                                  sample_dir: Path):
    """Shared staging mounted elsewhere on another machine: a reader there resolves every
    version under its own STAGING_DIR, never at the path the stager's machine recorded."""
    import shutil

    settings = make_settings(tmp_path, sample_dir, shard_count=3)
    stage_source(SOURCES["crm"], settings)
    elsewhere = tmp_path / "mounted-elsewhere"
    shutil.move(settings.staging_dir, elsewhere)  # the stager's path no longer exists
    staged = staging.read_pointer(str(elsewhere), "crm")
    assert Path(staged.version_dir).parent == elsewhere / "crm"
    files = [f for k in range(3) for f in staged.slice_files(k)]
    assert files and all(f.startswith(str(elsewhere)) for f in files)
