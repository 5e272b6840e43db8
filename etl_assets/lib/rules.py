"""The business rules, defined once, as DuckDB macros and the merge query.

Every place that normalizes a categorical, scores a customer or merges sources goes through the
macros installed by `install_rules`, so the pipeline, the checks and the tests cannot disagree.
"""

from __future__ import annotations

import duckdb

from etl_assets.lib.schema import SOURCES

# Thresholds are part of the rule text on purpose: a rule change is a code change (and bumps
# CODE_VERSION in freshness.py so every shard is recomputed).
RULE_MACROS: tuple[str, ...] = (
    # Categoricals compare trimmed, case-insensitively, spaces/hyphens/underscores alike.
    r"""CREATE OR REPLACE TEMP MACRO etl_norm(v) AS
        regexp_replace(lower(trim(v)), '[\s_-]+', '_', 'g')""",
    # customer_id, one rule for every source: Unicode whitespace (exactly what Python's
    # str.isspace() calls space: \p{Z}, \t \n \v \f \r, \x1c-\x1f, \x85) is trimmed at both ends;
    # empty is NULL. RE2's \s is ASCII-only and DuckDB's trim() keeps tabs, hence the class.
    r"""CREATE OR REPLACE TEMP MACRO etl_customer_id(v) AS nullif(regexp_replace(v,
        '^[\p{Z}\t\n\x{0B}\f\r\x{1C}-\x{1F}\x{85}]+|[\p{Z}\t\n\x{0B}\f\r\x{1C}-\x{1F}\x{85}]+$',
        '', 'g'), '')""",
    # A trimmed id is invalid if it holds a character that prints as nothing or as a plain space
    # while being something else: control/format characters (Cc, Cf: tab, zero-width space, BOM,
    # RTL marks), line/paragraph separators, and any space but U+0020. So two ids that print the
    # same can never be two customers: one of them is rejected.
    r"""CREATE OR REPLACE TEMP MACRO etl_customer_id_invalid(id) AS
        regexp_matches(id, '[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]|[^\P{Zs} ]')""",
    # Missing usage counts as 50%; missing open tickets as none.
    "CREATE OR REPLACE TEMP MACRO etl_usage(u) AS coalesce(CAST(u AS DOUBLE), 50)",
    "CREATE OR REPLACE TEMP MACRO etl_open(t) AS coalesce(t, 0)",
    """CREATE OR REPLACE TEMP MACRO etl_health_score(usage_pct, payment_status, nps_score, open_tickets) AS
        CAST(greatest(0, least(100, 50
          + CASE WHEN etl_usage(usage_pct) >= 80 THEN 20
                 WHEN etl_usage(usage_pct) >= 60 THEN 10
                 WHEN etl_usage(usage_pct) < 30 THEN -10 ELSE 0 END
          + CASE WHEN etl_norm(payment_status) = 'active' THEN 15
                 WHEN etl_norm(payment_status) IN ('past_due', 'failed') THEN -15 ELSE 0 END
          + CASE WHEN nps_score IS NULL THEN 0
                 WHEN nps_score >= 9 THEN 10
                 WHEN nps_score >= 7 THEN 5
                 WHEN nps_score <= 5 THEN -10 ELSE 0 END
          + CASE WHEN etl_open(open_tickets) = 0 THEN 5
                 WHEN etl_open(open_tickets) > 3 THEN -5 ELSE 0 END
        )) AS INTEGER)""",
    """CREATE OR REPLACE TEMP MACRO etl_churn_points(usage_pct, payment_status, nps_score, open_tickets) AS
          CASE WHEN etl_usage(usage_pct) < 30 THEN 3 WHEN etl_usage(usage_pct) < 50 THEN 1 ELSE 0 END
        + CASE WHEN etl_norm(payment_status) IN ('past_due', 'failed') THEN 3 ELSE 0 END
        + CASE WHEN nps_score <= 6 THEN 2 ELSE 0 END
        + CASE WHEN etl_open(open_tickets) > 3 THEN 1 ELSE 0 END""",
    """CREATE OR REPLACE TEMP MACRO etl_expansion_points(usage_pct, plan, nps_score, deal_stage) AS
          CASE WHEN etl_usage(usage_pct) >= 80 THEN 3 WHEN etl_usage(usage_pct) >= 60 THEN 1 ELSE 0 END
        + CASE WHEN etl_norm(plan) IN ('starter', 'free', 'basic') THEN 2
               WHEN etl_norm(plan) IN ('business', 'professional') THEN 1 ELSE 0 END
        + CASE WHEN nps_score >= 9 THEN 2 ELSE 0 END
        + CASE WHEN etl_norm(deal_stage) = 'enterprise' THEN 1 ELSE 0 END""",
    """CREATE OR REPLACE TEMP MACRO etl_level(points) AS
        CASE WHEN points >= 5 THEN 'HIGH' WHEN points >= 2 THEN 'MEDIUM' ELSE 'LOW' END""",
    """CREATE OR REPLACE TEMP MACRO etl_churn_risk(usage_pct, payment_status, nps_score, open_tickets) AS
        etl_level(etl_churn_points(usage_pct, payment_status, nps_score, open_tickets))""",
    """CREATE OR REPLACE TEMP MACRO etl_expansion_potential(usage_pct, plan, nps_score, deal_stage) AS
        etl_level(etl_expansion_points(usage_pct, plan, nps_score, deal_stage))""",
    # Routing: the first 4 bytes of md5(customer_id), big-endian, modulo the shard count.
    """CREATE OR REPLACE TEMP MACRO etl_shard(customer_id, shard_count) AS
        CAST(CAST('0x' || substr(md5(customer_id), 1, 8) AS UBIGINT) % shard_count AS INTEGER)""",
)


def install_rules(con: duckdb.DuckDBPyConnection) -> None:
    """Create the rule macros in this connection (temp macros: nothing is written to a file)."""
    for sql in RULE_MACROS:
        con.execute(sql)


def merge_sql() -> str:
    """The profile query over relations named after the sources (crm, billing, product, support).

    Each relation holds one shard's staged rows: customer_id, typed columns and row_hash. The
    query takes `$shard_id` and returns one row per distinct customer_id in any source, in no
    particular order: the one sort happens where the rows are written (`overwrite_shard`).
    """
    ids = " UNION ".join(f"SELECT customer_id FROM {name}" for name in SOURCES)
    # CRM is the system of record for identity: its email wins, the others only fill a gap.
    email = "coalesce(" + ", ".join(f"{name}.email" for name in SOURCES) + ") AS email"
    fields = [
        f"{name}.{col.name}"
        for name, source in SOURCES.items()
        for col in source.data_columns
        if col.name != "email"
    ]
    key_parts = ", ".join(f"coalesce({name}.row_hash, '-')" for name in SOURCES)
    joins = "\n".join(
        f"LEFT JOIN {name} ON {name}.customer_id = ids.customer_id" for name in SOURCES
    )
    return f"""
        WITH ids AS ({ids})
        SELECT ids.customer_id, {email}, {", ".join(fields)},
            etl_health_score(product.usage_pct, billing.payment_status, support.nps_score,
                             support.open_tickets) AS health_score,
            etl_churn_risk(product.usage_pct, billing.payment_status, support.nps_score,
                           support.open_tickets) AS churn_risk,
            etl_expansion_potential(product.usage_pct, billing.plan, support.nps_score,
                                    crm.deal_stage) AS expansion_potential,
            CAST($shard_id AS INTEGER) AS shard_id,
            ids.customer_id || ':' || md5(concat_ws('|', {key_parts})) AS idempotency_key
        FROM ids
        {joins}
    """
