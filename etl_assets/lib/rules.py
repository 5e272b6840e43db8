"""The business rules, defined once, as DuckDB macros and the merge query.

Two owners: the engine's macros are code (the id rule, categorical normalization, routing), the
domain's are the declaration's (`DECLARATION`, etl_assets/customers.yaml: the scores, which
source wins a shared column). Every place that normalizes a categorical, scores a customer or
merges sources goes through the macros installed by `install_rules` and `merge_sql`, so the
pipeline, the checks and the tests cannot disagree.
"""

from __future__ import annotations

import duckdb

from etl_assets.lib import declaration, declaration_file
from etl_assets.lib.declaration import Declaration

# The engine's rules, the same for every declaration (a change here bumps CODE_VERSION in
# freshness.py so every shard is recomputed; a change to the declaration does so by itself).
ENGINE_MACROS: tuple[str, ...] = (
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
    # Routing: the first 4 bytes of md5(customer_id), big-endian, modulo the shard count.
    """CREATE OR REPLACE TEMP MACRO etl_shard(customer_id, shard_count) AS
        CAST(CAST('0x' || substr(md5(customer_id), 1, 8) AS UBIGINT) % shard_count AS INTEGER)""",
)


# The shipped declaration, checked against the engine's macros: the customer domain.
DECLARATION: Declaration = declaration_file.load(declaration.SHIPPED, ENGINE_MACROS)

def rule_macros(decl: Declaration) -> tuple[str, ...]:
    """The engine's macros, then the declaration's."""
    return ENGINE_MACROS + tuple(m.create_sql for m in decl.macros)


RULE_MACROS: tuple[str, ...] = rule_macros(DECLARATION)


def install_rules(con: duckdb.DuckDBPyConnection, decl: Declaration = DECLARATION) -> None:
    """Create the rule macros of `decl` in this connection (temp macros: nothing is written to
    a file)."""
    for sql in rule_macros(decl):
        con.execute(sql)


def merge_sql(decl: Declaration = DECLARATION) -> str:
    """The profile query over relations named after the sources (crm, billing, product, support).

    Each relation holds one shard's staged rows: the key, typed columns and row_hash. The query
    takes `$shard_id` and returns one row per distinct key in any source, in no particular
    order: the one sort happens where the rows are written (`overwrite_shard`). The merged row
    is built first; the derived columns are computed over it, as the declaration was checked.
    """
    key, names = decl.key, [s.name for s in decl.sources]
    ids = " UNION ".join(f"SELECT {key} FROM {name}" for name in names)
    fields = []
    for column, _ in decl.merged_columns()[1:]:
        carriers = decl.carriers(column)
        # A shared column: the preferred source's value, the others only fill a gap.
        fields.append(f"{carriers[0]}.{column}" if len(carriers) == 1 else
                      f"coalesce({', '.join(f'{s}.{column}' for s in carriers)}) AS {column}")
    key_parts = ", ".join(f"coalesce({name}.row_hash, '-')" for name in names)
    joins = "\n".join(f"LEFT JOIN {name} ON {name}.{key} = ids.{key}" for name in names)
    derived = {d.name: d.select_sql for d in decl.derived}
    exported = ",\n".join(derived.get(column, column) for column in decl.export)
    return f"""
        WITH ids AS ({ids}),
        merged AS (
            SELECT ids.{key}, {", ".join(fields)},
                ids.{key} || ':' || md5(concat_ws('|', {key_parts})) AS idempotency_key
            FROM ids
            {joins}
        )
        SELECT {exported},
            CAST($shard_id AS INTEGER) AS shard_id, idempotency_key
        FROM merged
    """


def _code(sql: str, indent: str = "") -> str:
    """`sql` as inline code, or as an SQL block when one line would not hold it."""
    if "\n" not in sql and "`" not in sql:
        return f"`{sql}`"
    body = "\n".join(f"{indent}{line}" if line else "" for line in sql.splitlines())
    return f"\n\n{indent}```sql\n{body}\n{indent}```"


def rules_markdown(decl: Declaration = DECLARATION) -> str:
    """docs/rules.md's generated part: shared columns, derived columns and the macros, from the
    declaration (a test holds the page to it)."""
    lines = ["**Shared columns**, the first non-empty value in this order:", ""]
    lines += [f"- `{column}`: {', '.join(sources)}" for column, sources in decl.prefer]
    lines += ["", "**Derived columns**, computed over the merged row (types from DuckDB):", ""]
    lines += [f"- `{d.name}` ({d.sql_type}) = {_code(d.sql, '  ')}" for d in decl.derived]
    if decl.macros:
        lines += ["", "**Macros** they use:", "", "```sql"]
        for i, m in enumerate(decl.macros):
            body = "\n".join(f"  {line}" if line else "" for line in m.sql.splitlines())
            lines += [*([""] if i else []), f"MACRO {m.name}({', '.join(m.params)}) AS", body]
        lines += ["```"]
    return "\n".join(lines)
