"""The four source files' typed schemas and domains, and the profile's column order.

This is the single place that says what a valid source row looks like; validation SQL, staging,
the generator and the docs are all derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["id", "text", "int", "decimal", "money", "date", "category"]

# How precise each numeric kind is. A value beyond its kind's precision is rejected, never
# rounded: money keeps at most MONEY_DECIMALS decimals (trailing zeros aside), a decimal at most
# DECIMAL_DIGITS significant digits (a double holds any 15-digit decimal exactly as written),
# an integer must fit BIGINT.
MONEY_DECIMALS = 2
DECIMAL_DIGITS = 15

# The largest field and line the platform carries, in bytes (UTF-8). A field past
# MAX_FIELD_BYTES is rejected as field_too_long(<column>) where rows enter; a physical record
# past MAX_LINE_BYTES is refused by the CSV reader (malformed_row). Every later reader (the
# export's re-read in the checks and the drill) is configured with MAX_LINE_BYTES, which holds
# any profile row: a test checks that every column at MAX_FIELD_BYTES, each byte quoted, fits.
MAX_FIELD_BYTES = 100_000
MAX_LINE_BYTES = 10_000_000

# DuckDB type each kind is staged as. Money is exact; other measures are doubles.
SQL_TYPES: dict[str, str] = {
    "id": "VARCHAR",
    "text": "VARCHAR",
    "int": "BIGINT",
    "decimal": "DOUBLE",
    "money": f"DECIMAL(18,{MONEY_DECIMALS})",
    "date": "DATE",
    "category": "VARCHAR",
}

PLANS = ("Starter", "Business", "Professional", "Enterprise")
PAYMENT_STATUSES = ("Active", "Past Due", "Failed")
DEAL_STAGES = ("Lead", "Qualified", "Proposal", "Negotiation", "Closed Won", "Enterprise")
ACCOUNT_STATUSES = ("Active", "Inactive", "Trial")


@dataclass(frozen=True)
class Column:
    """One source column: its kind, optional inclusive range, and domain for categoricals."""

    name: str
    kind: Kind
    min: float | None = None
    max: float | None = None
    domain: tuple[str, ...] = ()

    @property
    def sql_type(self) -> str:
        return SQL_TYPES[self.kind]

    @property
    def decimals(self) -> int | None:
        """Most decimals a value may have (money only; trailing zeros do not count)."""
        return MONEY_DECIMALS if self.kind == "money" else None

    @property
    def significant_digits(self) -> int | None:
        """Most significant digits a value may have (decimals, which are stored as doubles)."""
        return DECIMAL_DIGITS if self.kind == "decimal" else None

    @property
    def precision(self) -> str:
        """The column's precision in words, for the docs ("" for non-numbers)."""
        if self.kind == "int":
            return "64-bit"
        if self.decimals is not None:
            return f"{self.decimals} decimals"
        if self.significant_digits is not None:
            return f"{self.significant_digits} digits"
        return ""


@dataclass(frozen=True)
class SourceSchema:
    """A source file: its asset name, file name, columns in file order, and what it describes."""

    name: str
    filename: str
    columns: tuple[Column, ...]
    description: str

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def data_columns(self) -> tuple[Column, ...]:
        """Every column but customer_id."""
        return tuple(c for c in self.columns if c.kind != "id")


_ID = Column("customer_id", "id")
_EMAIL = Column("email", "text")

SOURCES: dict[str, SourceSchema] = {
    s.name: s
    for s in (
        SourceSchema(
            "crm",
            "crm.csv",
            (
                _ID,
                _EMAIL,
                Column("company_name", "text"),
                Column("industry", "text"),
                Column("employee_count", "int", min=0),
                Column("deal_stage", "category", domain=DEAL_STAGES),
                Column("deal_value", "money", min=0),
                Column("sales_owner", "text"),
                Column("last_contact", "date"),
            ),
            "CRM accounts: the system of record for identity fields (email, company).",
        ),
        SourceSchema(
            "billing",
            "billing.csv",
            (
                _ID,
                _EMAIL,
                Column("plan", "category", domain=PLANS),
                Column("mrr", "money", min=0),
                Column("payment_status", "category", domain=PAYMENT_STATUSES),
                Column("subscription_start", "date"),
                Column("last_payment", "date"),
            ),
            "Billing subscriptions: plan, monthly recurring revenue and payment status.",
        ),
        SourceSchema(
            "product",
            "product.csv",
            (
                _ID,
                _EMAIL,
                Column("signup_date", "date"),
                Column("last_active", "date"),
                Column("total_sessions", "int", min=0),
                Column("features_used", "int", min=0),
                Column("usage_pct", "decimal", min=0, max=100),
                Column("account_status", "category", domain=ACCOUNT_STATUSES),
            ),
            "Product analytics: sessions, feature adoption and usage percentage.",
        ),
        SourceSchema(
            "support",
            "support.csv",
            (
                _ID,
                _EMAIL,
                Column("total_tickets", "int", min=0),
                Column("open_tickets", "int", min=0),
                Column("avg_resolution_hrs", "decimal", min=0),
                Column("last_ticket_date", "date"),
                Column("nps_score", "int", min=0, max=10),
                Column("csat_score", "decimal", min=0, max=5),
            ),
            "Support desk: ticket counts, resolution time, NPS and CSAT.",
        ),
    )
}

# Cross-column rules: (source, left column, right column) meaning left <= right; a row that
# breaks one is rejected as `<left>_exceeds_<right>`.
NOT_GREATER_THAN: tuple[tuple[str, str, str], ...] = (("support", "open_tickets", "total_tickets"),)

SCORE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("health_score", "INTEGER"),
    ("churn_risk", "VARCHAR"),
    ("expansion_potential", "VARCHAR"),
)


def profile_columns() -> list[tuple[str, str]]:
    """The profile row, in export order: id, email, each source's other columns, scores, keys."""
    cols: list[tuple[str, str]] = [("customer_id", "VARCHAR"), ("email", "VARCHAR")]
    for source in SOURCES.values():
        cols += [(c.name, c.sql_type) for c in source.data_columns if c.name != "email"]
    cols += list(SCORE_COLUMNS)
    cols += [("shard_id", "INTEGER"), ("idempotency_key", "VARCHAR")]
    return cols


_KIND_LABELS: dict[str, str] = {
    "id": "text",
    "text": "text",
    "int": "integer",
    "decimal": "decimal",
    "money": "money",
    "date": "date YYYY-MM-DD",
}


def _number(value: float) -> str:
    return f"{value:g}"


def _column_row(col: Column) -> str:
    """One table row: column, human-readable type, rule."""
    if col.kind == "category":
        kind = "one of: " + ", ".join(col.domain)
        rule = "any case; space, `-` and `_` alike"
    else:
        kind = _KIND_LABELS[col.kind] + (f" ({col.precision})" if col.precision else "")
        if col.kind == "id":
            rule = "required, the join key"
        elif col.min is not None and col.max is not None:
            rule = f"{_number(col.min)}–{_number(col.max)}"
        elif col.min is not None:
            rule = f"≥ {_number(col.min)}"
        elif col.max is not None:
            rule = f"≤ {_number(col.max)}"
        else:
            rule = ""
    return f"| `{col.name}` | {kind} | {rule} |"


def columns_markdown() -> str:
    """The "bring your own data" reference: one Markdown table per source file, from `SOURCES`.

    Deterministic (file order, column order), so a test can hold the README to it.
    """
    parts: list[str] = []
    for source in SOURCES.values():
        lines = [
            f"**`{source.filename}`**: {source.description}",
            "",
            "| column | type | rule |",
            "|---|---|---|",
            *(_column_row(col) for col in source.columns),
        ]
        for name, left, right in NOT_GREATER_THAN:
            if name == source.name:
                lines += ["", f"A row with `{left}` greater than `{right}` is rejected "
                              f"(`{left}_exceeds_{right}`)."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
