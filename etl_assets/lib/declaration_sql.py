"""A declaration's SQL, checked with DuckDB before anything runs.

In an in-memory connection: no name is an SQL keyword; the declaration's macros install beside
the engine's and take no existing function's name; each macro body and derived expression is
one expression (parsed by DuckDB, not by us) that depends on its own row alone and is the same
on every run; each derived column is described over an empty table `merged` typed as the
merged row, selected exactly as the merge query selects it. DuckDB's answer is the column's
SQL type, which must be one a CSV column holds the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

import duckdb

from etl_assets.lib.declaration import Declaration, Derived, Document, Path_

# Scalar types that print the same on every machine (no time zone, no nesting).
COLUMN_TYPE = re.compile(r"(BOOLEAN|U?(TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT)|FLOAT|DOUBLE|"
                         r"DECIMAL\(\d+,\d+\)|VARCHAR|DATE|TIME|TIMESTAMP)\Z")
_OWN_ROW = "a derived value comes from its own row, the same on every run"
_NOT_ALLOWED = {"WINDOW": "a window function", "SUBQUERY": "a subquery",
                "PARAMETER": "a parameter", "STAR": "a star expression"}
_EMPTY_CLAUSES = ("where_clause", "having", "qualify", "sample", "group_expressions",
                  "modifiers")


def check_sql(doc: Document, decl: Declaration, engine_macros: Sequence[str]) -> Declaration:
    """`decl` with its derived columns' SQL types; fails on the first SQL problem."""
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        _no_keywords(doc, decl, con)
        for sql in engine_macros:
            con.execute(sql)
        functions = con.execute("SELECT DISTINCT lower(function_name), stability "
                                "FROM duckdb_functions()").fetchall()
        taken = {name for name, _ in functions}
        unstable = {name for name, stability in functions
                    if stability in ("VOLATILE", "CONSISTENT_WITHIN_QUERY")}
        _domains_distinct(doc, decl, con)
        for macro in decl.macros:
            path: Path_ = ("macros", macro.name)
            if macro.name.lower() in taken:
                # A temp macro would silently replace a DuckDB function, in the engine's SQL too.
                doc.fail(path, f"duplicate name: '{macro.name}' is a DuckDB function or an "
                               "engine macro")
            _one_expression(doc, con, macro.sql, (*path, "sql"), unstable)
            try:
                con.execute(macro.create_sql)
            except duckdb.Error as exc:
                doc.fail((*path, "sql"), _problem(exc))
        columns = ", ".join(f"{name} {sql_type}" for name, sql_type in decl.merged_columns())
        con.execute(f"CREATE TEMP TABLE merged ({columns})")
        typed = tuple(_derived_type(doc, con, decl.key, d, unstable) for d in decl.derived)
    finally:
        con.close()
    return dataclasses.replace(decl, derived=typed)


def _derived_type(doc: Document, con: duckdb.DuckDBPyConnection, key: str, derived: Derived,
                  unstable: set[str]) -> Derived:
    path: Path_ = ("derived", derived.name)
    _one_expression(doc, con, derived.sql, path, unstable)
    try:
        # Beside the key, as in the merge: an aggregate fails here as it would there.
        rows = con.execute(f"DESCRIBE SELECT {key}, {derived.select_sql} FROM merged").fetchall()
    except duckdb.Error as exc:
        doc.fail(path, _problem(exc))
    if len(rows) != 2:
        doc.fail(path, "must be one SQL expression")
    sql_type = rows[1][1]
    if not COLUMN_TYPE.match(sql_type):
        doc.fail(path, f"its type is {sql_type}, not a column type (BOOLEAN, an integer, FLOAT, "
                       "DOUBLE, DECIMAL, VARCHAR, DATE, TIME or TIMESTAMP)")
    return dataclasses.replace(derived, sql_type=sql_type)


def _domains_distinct(doc: Document, decl: Declaration, con: duckdb.DuckDBPyConnection) -> None:
    """Two domain values the engine's etl_norm reads alike would be one value (and the second
    spelling unreachable): refused here, with the rule that will compare them."""
    for s in decl.sources:
        for c in s.columns:
            if not c.domain:
                continue
            values = ", ".join(_dollar_quoted(v) for v in c.domain)
            normalized = con.execute(f"SELECT list_transform([{values}], v -> etl_norm(v))"
                                     ).fetchone()[0]
            for i, value in enumerate(normalized):
                if value in normalized[:i]:
                    first = c.domain[normalized.index(value)]
                    doc.fail(("sources", s.name, "columns", c.name, "domain", i),
                             f"'{c.domain[i]}' is '{first}' once normalized (case, spaces, - "
                             "and _ do not tell values apart)")


def _no_keywords(doc: Document, decl: Declaration, con: duckdb.DuckDBPyConnection) -> None:
    """Names go into SQL unquoted: none may be a keyword DuckDB reserves in some place."""
    keywords = {k for (k,) in con.execute(
        "SELECT keyword_name FROM duckdb_keywords() WHERE keyword_category <> 'unreserved'"
    ).fetchall()}
    named: list[tuple[Path_, str]] = [(("key",), decl.key)]
    for s in decl.sources:
        named += [(("sources", s.name), s.name)]
        named += [(("sources", s.name, "columns", c.name), c.name) for c in s.columns]
    for m in decl.macros:
        named += [(("macros", m.name), m.name)]
        named += [(("macros", m.name, "params", i), p) for i, p in enumerate(m.params)]
    named += [(("derived", d.name), d.name) for d in decl.derived]
    for path, name in named:
        if name.lower() in keywords:
            doc.fail(path, f"'{name}' is an SQL keyword; choose another name")


def _one_expression(doc: Document, con: duckdb.DuckDBPyConnection, sql: str, path: Path_,
                    unstable: set[str]) -> None:
    """Fail unless `sql` parses as exactly one expression that depends on its row alone."""
    query = _dollar_quoted(f"SELECT (\n{sql}\n)")
    tree = json.loads(con.execute(f"SELECT json_serialize_sql({query})").fetchone()[0])
    if tree.get("error"):
        doc.fail(path, _first_line(str(tree.get("error_message", "does not parse"))))
    statements = tree.get("statements", [])
    node = statements[0]["node"] if len(statements) == 1 else {}
    # Text that closes our parenthesis and opens another clause or statement is not one
    # expression, whatever DuckDB would make of it.
    if node.get("type") != "SELECT_NODE" or len(node.get("select_list", [])) != 1 \
            or node.get("from_table", {}).get("type") != "EMPTY" \
            or any(node.get(clause) for clause in _EMPTY_CLAUSES) \
            or node.get("cte_map", {}).get("map"):
        doc.fail(path, "must be one SQL expression")
    problem = _not_own_row(node["select_list"][0], unstable)
    if problem:
        doc.fail(path, problem)


def _dollar_quoted(text: str) -> str:
    """`text` as a DuckDB string literal, exactly: $tag$...$tag$ with a tag it does not hold.

    Not a bound parameter: binding one makes DuckDB import pandas, half a second added to every
    command that loads the declaration (it is loaded on import).
    """
    tag = "etl"
    while tag in text:
        tag += "_"
    return f"${tag}${text}${tag}$"


def _not_own_row(tree: object, unstable: set[str]) -> str | None:
    """Why the parsed expression `tree` is not a function of its own row, or None."""
    if isinstance(tree, dict):
        kind = tree.get("class")
        if kind in _NOT_ALLOWED:
            return f"{_NOT_ALLOWED[kind]} is not allowed: {_OWN_ROW}"
        name = str(tree.get("function_name", "")).lower()
        if kind == "FUNCTION" and name in unstable:
            return f"{name}() is not the same on every run: {_OWN_ROW}"
        children: list[object] = list(tree.values())
    elif isinstance(tree, list):
        children = tree
    else:
        return None
    return next((p for p in (_not_own_row(c, unstable) for c in children) if p), None)


def _problem(exc: duckdb.Error) -> str:
    """DuckDB's error in the declaration's words, on one line."""
    text = str(exc)
    column = re.search(r'Referenced column "([^"]+)" not found', text)
    if column:
        candidate = re.search(r'Candidate bindings: "(?:merged\.)?([^"]+)"', text)
        hint = f" (did you mean {candidate.group(1)}?)" if candidate else ""
        return f"column '{column.group(1)}' is not declared by any source{hint}"
    table = re.search(r'Referenced table "([^"]+)" not found', text)
    if table:
        return (f"'{table.group(1)}.' names a table: an expression sees the merged row's "
                "columns by name alone")
    if "must appear in the GROUP BY clause" in text:
        return f"an aggregate is not allowed: {_OWN_ROW}"
    return _first_line(text)


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "fails in DuckDB"
