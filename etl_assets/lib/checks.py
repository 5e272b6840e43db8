"""What the blocking checks on `customer_profiles` compare: the table and the export against the
staged sources themselves, read-only."""

from __future__ import annotations

from dataclasses import dataclass

from etl_assets.lib import freshness, staging, warehouse
from etl_assets.lib.paths import duckdb_literal, duckdb_literals
from etl_assets.lib.schema import MAX_LINE_BYTES
from etl_assets.lib.settings import EtlSettings

WH = warehouse.ALIAS


class NoWarehouseError(RuntimeError):
    """There is no warehouse file to check yet."""


@dataclass(frozen=True)
class ProfileFacts:
    """Counts read from the staged sources, the table and the export, and the stale shards."""

    distinct_source_customers: int
    table_rows: int
    distinct_ids: int
    distinct_keys: int
    export_rows: int
    stale_shards: list[int]


def profile_facts(settings: EtlSettings) -> ProfileFacts:
    """Read everything the four checks compare, in one read-only pass over the warehouse.

    Read-only: a user's read-only connection to the warehouse does not block the checks.
    """
    staged = staging.current_sources(settings)
    slice_paths = duckdb_literals(staging.all_slice_files(staged, settings.shard_ids))
    with warehouse.read_only(settings.duckdb_path, settings.lock_timeout_s,
                             settings.duckdb_limits) as con:
        if con is None:
            raise NoWarehouseError(f"{settings.duckdb_path}: no warehouse yet; "
                                   "materialize customer_profiles first")
        expected = con.execute(
            "SELECT count(DISTINCT customer_id) FROM read_parquet($paths)", {"paths": slice_paths}
        ).fetchone()[0]
        rows, ids, keys = con.execute(
            f"SELECT count(*), count(DISTINCT customer_id), count(DISTINCT idempotency_key) "
            f"FROM {WH}.customer_profiles"
        ).fetchone()
        export_rows = con.execute(
            "SELECT count(*) FROM read_csv($path, header = true, all_varchar = true, "
            "max_line_size = $max_line)",
            {"path": duckdb_literal(settings.export_path), "max_line": MAX_LINE_BYTES},
        ).fetchone()[0]
        stale = freshness.stale_shards(settings, con)
    return ProfileFacts(int(expected), int(rows), int(ids), int(keys), int(export_rows), stale)
