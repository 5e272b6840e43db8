"""The blocking asset checks on `customer_profiles`: every customer came through exactly once.

They are evaluated by the asset itself, on what it staged and before it publishes (write,
audit, publish: see lib/checks.py, where each check is defined); this module gives Dagster
their specs and turns the library's outcomes into check results.
"""


import dagster as dg

from etl_assets.lib.checks import CheckOutcome, profile_check_descriptions


def profile_check_specs(asset: dg.AssetKey, key: str) -> list[dg.AssetCheckSpec]:
    """The blocking checks, as the merged asset (`asset`, its pipeline's key column `key`)
    declares them."""
    return [dg.AssetCheckSpec(name, asset=asset, blocking=True, description=description)
            for name, description in profile_check_descriptions(key).items()]


def check_results(outcomes: list[CheckOutcome]) -> list[dg.AssetCheckResult]:
    """The library's outcomes as Dagster check results."""
    return [dg.AssetCheckResult(check_name=o.name, passed=bool(o.passed), metadata=o.metadata,
                                description=o.description)
            for o in outcomes]
