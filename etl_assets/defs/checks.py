"""The blocking asset checks on `customer_profiles`: every customer came through exactly once.

They are evaluated by the asset itself, on what it staged and before it publishes (write,
audit, publish: see lib/checks.py, where each check is defined); this module gives Dagster
their specs and turns the library's outcomes into check results.
"""


import dagster as dg

from etl_assets.defs.contracts import CUSTOMER_PROFILES
from etl_assets.lib.checks import PROFILE_CHECKS, CheckOutcome


def profile_check_specs() -> list[dg.AssetCheckSpec]:
    """The four blocking checks, as the customer_profiles asset declares them."""
    return [dg.AssetCheckSpec(name, asset=CUSTOMER_PROFILES, blocking=True,
                              description=description)
            for name, description in PROFILE_CHECKS.items()]


def check_results(outcomes: list[CheckOutcome]) -> list[dg.AssetCheckResult]:
    """The library's outcomes as Dagster check results."""
    return [dg.AssetCheckResult(check_name=o.name, passed=bool(o.passed), metadata=o.metadata,
                                description=o.description)
            for o in outcomes]
