"""Blocking asset checks on `customer_profiles`: every customer came through exactly once."""


from collections.abc import Iterator

import dagster as dg

from etl_assets.defs.contracts import CUSTOMER_PROFILES, not_retryable
from etl_assets.defs.resources import (
    StagingResource,
    WarehouseResource,
    step_settings,
)
from etl_assets.lib.checks import NoWarehouseError, ProfileFacts, profile_facts
from etl_assets.lib.events import report_progress


def _spec(name: str, description: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(name, asset=CUSTOMER_PROFILES, blocking=True, description=description)


PROFILE_CHECKS = [
    _spec("row_count_matches_sources",
          "profiles (table and export) = distinct accepted customer_ids across sources"),
    _spec("no_duplicate_customer_id", "each customer_id appears once"),
    _spec("idempotency_keys_unique", "each idempotency_key appears once"),
    _spec("shards_current",
          "every shard partition was written from the current source data and code"),
]


def build_profile_checks(shard_count: int) -> dg.AssetChecksDefinition:
    """The four blocking checks, evaluated together in one read-only pass."""

    @dg.multi_asset_check(specs=PROFILE_CHECKS, name="customer_profiles_checks")
    def customer_profiles_checks(
        context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource,
        staging: StagingResource,
    ) -> Iterator[dg.AssetCheckResult]:
        settings = step_settings(context, shard_count, warehouse, staging)
        report_progress("checks")
        try:
            facts = profile_facts(settings)
        except NoWarehouseError as exc:
            raise not_retryable(exc) from exc
        yield from _results(facts, shard_count)

    return customer_profiles_checks


def _results(facts: ProfileFacts, shard_count: int) -> Iterator[dg.AssetCheckResult]:
    rows, expected, export_rows = facts.table_rows, facts.distinct_source_customers, facts.export_rows
    stale = facts.stale_shards
    yield dg.AssetCheckResult(
        check_name="row_count_matches_sources",
        passed=rows == expected == export_rows,
        metadata={"table_rows": rows, "export_rows": export_rows,
                  "distinct_source_customers": expected},
    )
    yield dg.AssetCheckResult(
        check_name="no_duplicate_customer_id",
        passed=rows == facts.distinct_ids,
        metadata={"rows": rows, "distinct_customer_ids": facts.distinct_ids,
                  "duplicates": rows - facts.distinct_ids},
    )
    yield dg.AssetCheckResult(
        check_name="idempotency_keys_unique",
        passed=rows == facts.distinct_keys,
        metadata={"rows": rows, "distinct_keys": facts.distinct_keys},
    )
    yield dg.AssetCheckResult(
        check_name="shards_current",
        passed=not stale,
        metadata={"shards": shard_count, "stale_or_missing": ", ".join(map(str, stale))},
        description=(f"stale or missing shards: {stale}" if stale else "all shards current"),
    )
