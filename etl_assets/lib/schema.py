"""The sources' typed schemas and domains, and the profile's column order, derived from the
declaration (`rules.DECLARATION`, etl_assets/customers.yaml).

This is where the engine reads what a valid source row looks like; validation SQL, staging,
the generator and the docs all take it from here, and it takes it from the declaration.
"""

from __future__ import annotations

from etl_assets.lib.declaration import (
    DECIMAL_DIGITS,
    MONEY_DECIMALS,
    SQL_TYPES,
    Column,
    Declaration,
    Kind,
    SourceSchema,
)
from etl_assets.lib.rules import DECLARATION

__all__ = ["DECIMAL_DIGITS", "MONEY_DECIMALS", "SQL_TYPES", "Column", "Kind", "SourceSchema"]

# The largest field and line the platform carries, in bytes (UTF-8). A field past
# MAX_FIELD_BYTES is rejected as field_too_long(<column>) where rows enter; a physical record
# past MAX_LINE_BYTES is refused by the CSV reader (malformed_row). Every later reader (the
# export's re-read in the checks and the drill) is configured with MAX_LINE_BYTES, which holds
# any profile row: a test checks that every column at MAX_FIELD_BYTES, each byte quoted, fits.
MAX_FIELD_BYTES = 100_000
MAX_LINE_BYTES = 10_000_000

SOURCES: dict[str, SourceSchema] = {s.name: s for s in DECLARATION.sources}

# Cross-column rules: (source, left column, right column) meaning left <= right; a row that
# breaks one is rejected as `<left>_exceeds_<right>`.
NOT_GREATER_THAN: tuple[tuple[str, str, str], ...] = tuple(
    (s.name, left, right) for s in DECLARATION.sources for left, right in s.not_greater_than)

# The derived columns and their SQL types (DuckDB's, found when the declaration was checked).
SCORE_COLUMNS: tuple[tuple[str, str], ...] = tuple((d.name, d.sql_type) for d in DECLARATION.derived)


def _domain(source: str, column: str) -> tuple[str, ...]:
    return next(c.domain for c in SOURCES[source].columns if c.name == column)


# The customer domain's categoricals, for the data generator (which knows the customer files).
PLANS = _domain("billing", "plan")
PAYMENT_STATUSES = _domain("billing", "payment_status")
DEAL_STAGES = _domain("crm", "deal_stage")
ACCOUNT_STATUSES = _domain("product", "account_status")


def profile_columns(decl: Declaration = DECLARATION) -> list[tuple[str, str]]:
    """The profile row, in export order: the declaration's export columns (by default the key,
    each source's columns, the derived columns), then the engine's shard id and key."""
    types = decl.column_types()
    return [(name, types[name]) for name in decl.export] + [
        ("shard_id", "INTEGER"), ("idempotency_key", "VARCHAR")]


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
    if col.required and col.kind != "id":
        rule = "required" + (f"; {rule}" if rule else "")
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
        for left, right in source.not_greater_than:
            lines += ["", f"A row with `{left}` greater than `{right}` is rejected "
                          f"(`{left}_exceeds_{right}`)."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
