"""Every branch of every rule, through the SQL macros the pipeline itself uses."""

import duckdb
import pytest

from etl_assets.lib.rules import install_rules
from etl_assets_tests.conftest import build_profiles, make_settings, write_sources


@pytest.fixture(scope="module")
def con():
    c = duckdb.connect()
    install_rules(c)
    yield c
    c.close()


def q(con, expr, *args):
    return con.execute(f"SELECT {expr}", list(args)).fetchone()[0]


@pytest.mark.parametrize("raw", ["Past Due", "past-due", "past_due", "  PAST  DUE ", "Past-Due"])
def test_categoricals_normalize_alike(con, raw):
    assert q(con, "etl_norm(?)", raw) == "past_due"


@pytest.mark.parametrize(
    "usage, delta",
    [(95, 20), (80, 20), (79.9, 10), (60, 10), (59.9, 0), (30, 0), (29.9, -10), (0, -10),
     (None, 0)],  # missing usage counts as 50
)
def test_health_usage_branches(con, usage, delta):
    # payment empty (0), nps missing (0), open tickets 2 (0): only usage moves the score.
    assert q(con, "etl_health_score(?, NULL, NULL, 2)", usage) == 50 + delta


@pytest.mark.parametrize(
    "payment, delta",
    [("Active", 15), (" active ", 15), ("Past Due", -15), ("PAST-DUE", -15), ("past_due", -15),
     ("Failed", -15), ("failed", -15), (None, 0), ("", 0), ("Suspended", 0)],
)
def test_health_payment_branches(con, payment, delta):
    assert q(con, "etl_health_score(50, ?, NULL, 2)", payment) == 50 + delta


@pytest.mark.parametrize(
    "nps, delta", [(10, 10), (9, 10), (8, 5), (7, 5), (6, 0), (5, -10), (0, -10), (None, 0)]
)
def test_health_nps_branches(con, nps, delta):
    assert q(con, "etl_health_score(50, NULL, ?, 2)", nps) == 50 + delta


@pytest.mark.parametrize("open_tickets, delta", [(0, 5), (None, 5), (1, 0), (3, 0), (4, -5)])
def test_health_open_ticket_branches(con, open_tickets, delta):
    assert q(con, "etl_health_score(50, NULL, NULL, ?)", open_tickets) == 50 + delta


def test_health_extremes_stay_within_0_100(con):
    assert q(con, "etl_health_score(100, 'Active', 10, 0)") == 100
    assert q(con, "etl_health_score(0, 'Failed', 0, 9)") == 10
    assert q(con, "typeof(etl_health_score(50, NULL, NULL, 0))") == "INTEGER"


@pytest.mark.parametrize(
    "usage, payment, nps, open_tickets, points, level",
    [
        (29.9, None, None, 0, 3, "MEDIUM"),  # usage < 30
        (30, None, None, 0, 1, "LOW"),  # 30..49.9 -> 1
        (49.9, None, None, 0, 1, "LOW"),
        (50, None, None, 0, 0, "LOW"),
        (None, None, None, None, 0, "LOW"),  # missing usage = 50, missing open = 0
        (70, "Past Due", None, 0, 3, "MEDIUM"),
        (70, "past due", None, 0, 3, "MEDIUM"),  # normalized: the demo's bug, fixed
        (70, "FAILED", None, 0, 3, "MEDIUM"),
        (70, "Active", 6, 0, 2, "MEDIUM"),  # nps <= 6
        (70, "Active", 7, 0, 0, "LOW"),
        (70, "Active", 7, 4, 1, "LOW"),  # open > 3
        (70, "Active", 7, 3, 0, "LOW"),
        (40, "Active", 7, 4, 2, "MEDIUM"),
        (40, "Active", 6, 4, 4, "MEDIUM"),
        (20, "Past Due", None, 0, 6, "HIGH"),
        (45, "Failed", 6, 0, 6, "HIGH"),
        (10, "failed", 2, 9, 9, "HIGH"),
        (40, "Active", 6, 0, 3, "MEDIUM"),
    ],
)
def test_churn_points_and_levels(con, usage, payment, nps, open_tickets, points, level):
    args = (usage, payment, nps, open_tickets)
    assert q(con, "etl_churn_points(?, ?, ?, ?)", *args) == points
    assert q(con, "etl_churn_risk(?, ?, ?, ?)", *args) == level


@pytest.mark.parametrize(
    "usage, plan, nps, stage, points, level",
    [
        (80, None, None, None, 3, "MEDIUM"),
        (79.9, None, None, None, 1, "LOW"),
        (60, None, None, None, 1, "LOW"),
        (59.9, None, None, None, 0, "LOW"),
        (None, None, None, None, 0, "LOW"),
        (50, "Starter", None, None, 2, "MEDIUM"),
        (50, "free", None, None, 2, "MEDIUM"),
        (50, "BASIC", None, None, 2, "MEDIUM"),
        (50, "Business", None, None, 1, "LOW"),
        (50, "professional", None, None, 1, "LOW"),
        (50, "Enterprise", None, None, 0, "LOW"),
        (50, None, 9, None, 2, "MEDIUM"),
        (50, None, 8, None, 0, "LOW"),
        (50, None, None, "Enterprise", 1, "LOW"),
        (50, None, None, " enterprise", 1, "LOW"),
        (50, None, None, "Closed Won", 0, "LOW"),
        (85, "Starter", 9, "Enterprise", 8, "HIGH"),
        (65, "Business", 9, "Enterprise", 5, "HIGH"),
        (65, "Business", 9, "Lead", 4, "MEDIUM"),
    ],
)
def test_expansion_points_and_levels(con, usage, plan, nps, stage, points, level):
    args = (usage, plan, nps, stage)
    assert q(con, "etl_expansion_points(?, ?, ?, ?)", *args) == points
    assert q(con, "etl_expansion_potential(?, ?, ?, ?)", *args) == level


def test_merge_email_precedence_and_past_due(tmp_path):
    data = write_sources(tmp_path / "data", {
        "crm": [
            {"customer_id": "c1", "email": "crm1@x.com"},
            {"customer_id": "c2", "email": ""},
        ],
        "billing": [
            {"customer_id": "c2", "email": "bill2@x.com", "payment_status": "PAST DUE"},
            {"customer_id": "c1", "email": "bill1@x.com", "payment_status": "past-due"},
        ],
        "product": [{"customer_id": "c4", "email": "prod4@x.com", "usage_pct": "85"}],
        "support": [
            {"customer_id": "c1", "email": "placeholder@helpdesk"},
            {"customer_id": "c2", "email": "placeholder@helpdesk"},
            {"customer_id": "c3", "email": "only-support@x.com", "total_tickets": 5,
             "open_tickets": 4, "nps_score": 3},
        ],
    })
    profiles = build_profiles(make_settings(tmp_path, data, shard_count=3))
    assert sorted(profiles) == ["c1", "c2", "c3", "c4"]
    assert profiles["c1"]["email"] == "crm1@x.com"  # CRM wins over billing and support
    assert profiles["c2"]["email"] == "bill2@x.com"  # no CRM email: billing before support
    assert profiles["c3"]["email"] == "only-support@x.com"
    assert profiles["c4"]["email"] == "prod4@x.com"
    # "PAST DUE" and "past-due" are the domain's "Past Due": penalized, shown canonically.
    assert profiles["c1"]["payment_status"] == profiles["c2"]["payment_status"] == "Past Due"
    assert profiles["c1"]["health_score"] == 50 - 15 + 5
    assert profiles["c1"]["churn_risk"] == "MEDIUM"
    # Missing sources give nulls, never another source's value.
    assert profiles["c3"]["company_name"] is None and profiles["c3"]["plan"] is None
    assert profiles["c3"]["churn_risk"] == "MEDIUM"  # nps 3 (2) + open 4 (1)
    assert profiles["c4"]["expansion_potential"] == "MEDIUM"  # usage 85 -> 3
    assert {p["shard_id"] for p in profiles.values()} <= {0, 1, 2}
    assert all(p["idempotency_key"].startswith(p["customer_id"] + ":") for p in profiles.values())
