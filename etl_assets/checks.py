"""Blocking asset checks on `customer_profiles`: every customer came through exactly once."""


from collections.abc import Iterator

import dagster as dg

from etl_assets import staging, warehouse
from etl_assets.paths import duckdb_literal, duckdb_literals
from etl_assets.profiles import stale_shards
from etl_assets.schema import MAX_LINE_BYTES, SOURCES
from etl_assets.settings import EtlSettings

WH = warehouse.ALIAS

PROFILE_CHECKS = [
    dg.AssetCheckSpec(
        "row_count_matches_sources",
        asset="customer_profiles",
        blocking=True,
        description="profiles (table and export) = distinct accepted customer_ids across sources",
    ),
    dg.AssetCheckSpec(
        "no_duplicate_customer_id", asset="customer_profiles", blocking=True,
        description="each customer_id appears once",
    ),
    dg.AssetCheckSpec(
        "idempotency_keys_unique", asset="customer_profiles", blocking=True,
        description="each idempotency_key appears once",
    ),
    dg.AssetCheckSpec(
        "shards_current",
        asset="customer_profiles",
        blocking=True,
        description="every shard partition was written from the current source data and code",
    ),
]


@dg.multi_asset_check(specs=PROFILE_CHECKS, name="customer_profiles_checks")
def customer_profiles_checks(settings: EtlSettings) -> Iterator[dg.AssetCheckResult]:
    """Evaluate the four checks against the warehouse, the export and the staged sources."""
    staged = staging.current_sources(settings.staging_dir, list(SOURCES), settings.shard_count)
    slice_paths = duckdb_literals(staging.all_slice_files(staged, settings.shard_ids))
    # Read-only: a user's read-only connection to the warehouse does not block the checks.
    with warehouse.read_only(settings.duckdb_path, settings.lock_timeout_s,
                             settings.duckdb_limits) as con:
        if con is None:
            raise dg.Failure(description=f"{settings.duckdb_path}: no warehouse yet; "
                             "materialize customer_profiles first", allow_retries=False,
                             metadata={"retryable": False})
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
        stale = stale_shards(settings, con)
    yield dg.AssetCheckResult(
        check_name="row_count_matches_sources",
        passed=bool(rows == expected == export_rows),
        metadata={"table_rows": int(rows), "export_rows": int(export_rows),
                  "distinct_source_customers": int(expected)},
    )
    yield dg.AssetCheckResult(
        check_name="no_duplicate_customer_id",
        passed=bool(rows == ids),
        metadata={"rows": int(rows), "distinct_customer_ids": int(ids),
                  "duplicates": int(rows - ids)},
    )
    yield dg.AssetCheckResult(
        check_name="idempotency_keys_unique",
        passed=bool(rows == keys),
        metadata={"rows": int(rows), "distinct_keys": int(keys)},
    )
    yield dg.AssetCheckResult(
        check_name="shards_current",
        passed=not stale,
        metadata={"shards": settings.shard_count, "stale_or_missing": ", ".join(map(str, stale))},
        description=(f"stale or missing shards: {stale}" if stale else "all shards current"),
    )
