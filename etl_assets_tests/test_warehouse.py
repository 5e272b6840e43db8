"""The warehouse's rebuild of customer_profiles, on a real DuckDB file."""

from __future__ import annotations

from etl_assets.lib import warehouse
from etl_assets_tests.conftest import build_profiles, make_settings


def _insert_copy_of_shard_row(con, customer_id: str, shard_id: int) -> None:
    """Write one existing profile row a second time, as a shard that ran twice would."""
    con.execute(
        """INSERT INTO wh.shard_profiles
           SELECT * REPLACE (CAST(? AS INTEGER) AS shard_id) FROM wh.shard_profiles
           WHERE customer_id = ?""",
        [shard_id, customer_id],
    )


def test_rebuild_keeps_one_row_per_idempotency_key(tmp_path, sample_dir):
    """A repeated key (the same record written again under another shard id) yields one
    profile row, the one from its own shard; without repeats every shard row is kept, each
    shard's rows sorted by customer_id (customer_profiles is a view over one table per shard;
    the export is what is sorted as a whole)."""
    settings = make_settings(tmp_path, sample_dir, shard_count=3)
    profiles = build_profiles(settings)
    first = sorted(profiles)[0]
    with warehouse.reader(settings.duckdb_path, 5) as con:
        rows = con.execute("SELECT count(*) FROM wh.shard_profiles").fetchone()[0]
        assert warehouse.rebuild_customer_profiles(con, settings.shard_count) == rows
        ids = [r[0] for r in con.execute("SELECT customer_id FROM wh.customer_profiles").fetchall()]
        assert len(ids) == len(set(ids)) == len(profiles)
        for shard in range(settings.shard_count):
            in_shard = [r[0] for r in con.execute(
                "SELECT customer_id FROM wh.customer_profiles WHERE shard_id = ?", [shard]).fetchall()]
            assert in_shard == sorted(in_shard) and in_shard

        home = profiles[first]["shard_id"]
        _insert_copy_of_shard_row(con, first, shard_id=home + 7)
        assert con.execute("SELECT count(*) FROM wh.shard_profiles").fetchone()[0] == rows + 1
        assert warehouse.rebuild_customer_profiles(con, settings.shard_count) == rows
        kept = con.execute("SELECT shard_id FROM wh.customer_profiles WHERE customer_id = ?",
                           [first]).fetchall()
        assert kept == [(home,)]
