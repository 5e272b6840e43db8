"""`etl-assets init`: a declaration inferred from a folder of CSV files, for the user to edit.

One source per `*.csv` file, in file-name order, named after the file's stem (characters other
than letters, digits and `_` become `_`; a stem that still is not a name is refused). Every file
carries the key column (kind id). Each file is sniffed by DuckDB in the pipeline's own dialect
(comma, double quotes, a header line) and read as the pipeline reads it; a column's kind is the
first of these that holds for every value (the sniffer's type says which are candidates, the
values decide, with validation's own patterns):

- int: the sniffer reads integers; every value an integer that fits BIGINT, without a leading
  zero (`007` is a code, kept as text);
- money: the sniffer reads numbers; every value written with exactly two decimals (`12.50`):
  money is told from a decimal by how it is written, never by its name;
- decimal: the sniffer reads numbers; every value a plain decimal of at most 15 digits (`1e5` is
  not one);
- date: the sniffer reads dates; every value `YYYY-MM-DD`, the one date format the pipeline
  reads (`07/03/2026` is text);
- category: any other column with at most 20 distinct values as `etl_norm` compares them (case,
  spaces, `-` and `_` aside), each seen twice on average; its domain lists each value's most
  frequent spelling, sorted;
- text: the rest, and a column without any value.

A column several files carry takes the first kind that holds in each of them (a file where it
is empty does not vote). Ranges stay open, no column is required, `prefer`, `macros` and
`derived` are empty: the user's to fill. The text is checked by the project's loader before it
is written (atomically); the same folder gives the same bytes.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import yaml

from etl_assets.lib import declaration_file
from etl_assets.lib.declaration import KINDS, SourceSchema
from etl_assets.lib.paths import duckdb_literal
from etl_assets.lib.rules import ENGINE_MACROS
from etl_assets.lib.settings import SettingsError
from etl_assets.lib.validation import (
    DATE_PATTERN,
    DECIMAL_PATTERN,
    INT_PATTERN,
    READ_CSV,
    SourceFileError,
    read_csv_params,
    read_header,
)

# A category: at most this many distinct values, each seen this many times on average.
CATEGORY_MAX_VALUES = 20
CATEGORY_MIN_REPEATS = 2
# Digits a decimal may be written with (DECIMAL_DIGITS significant digits is the rule; counting
# every digit is stricter, so what init calls a decimal always validates as one).
DECIMAL_WRITTEN_DIGITS = 15
# Kinds in order of preference: the first that holds for every value is the column's.
PREFERENCE = ("int", "money", "decimal", "date", "category", "text")
_NUMERIC = ("int", "money", "decimal")
_INT_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
              "UINTEGER", "UBIGINT", "UHUGEINT"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NAME_RULE = "letters, digits and _, not starting with a digit"
_LINE_WIDTH = 100


@dataclass(frozen=True)
class Column:
    """A column as inferred: its kind and, for a category, its domain."""

    name: str
    kind: str
    domain: tuple[str, ...] = ()


@dataclass(frozen=True)
class Source:
    """A CSV file as inferred: the source's name, the file's name, its rows and columns."""

    name: str
    filename: str
    rows: int
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class _Seen:
    """What one file's values say about one column."""

    holds: tuple[str, ...]  # the kinds every value fits, in preference order
    values: int
    domain: tuple[str, ...]


def fail(message: str) -> SettingsError:
    """A problem with the folder, a file or the output: one line, exit 2, nothing written."""
    return SettingsError(message)


def source_name(path: Path) -> str:
    """The source's name for a file: its stem with other characters than letters, digits and
    _ as _, or SettingsError when that is still not a name."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", path.stem).strip("_")
    if not _NAME.match(name):
        raise fail(f"{path}: the file name gives no source name ({_NAME_RULE}); rename the file")
    return name


def infer(data_dir: str | Path, key: str) -> list[Source]:
    """Every `*.csv` file of `data_dir` as a source, its columns' kinds inferred."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise fail(f"{folder}: {'is not a directory' if folder.exists() else 'no such folder'}")
    if not _NAME.match(key):
        raise fail(f"--key {key!r} is not a column name ({_NAME_RULE})")
    paths = sorted(p for p in folder.glob("*.csv") if p.is_file())
    if not paths:
        raise fail(f"{folder}: no *.csv file to declare (one source per CSV file)")
    names: dict[str, Path] = {}
    for path in paths:
        name = source_name(path)
        if name.lower() in names:
            raise fail(f"{path}: its source name {name} is also {names[name.lower()].name}'s; "
                       "rename one of the files")
        names[name.lower()] = path
    con = duckdb.connect(":memory:", config={"threads": 2})
    try:
        for sql in ENGINE_MACROS:
            con.execute(sql)
        seen = {path: _read(con, path, key) for path in paths}
    finally:
        con.close()
    kinds, domains = _agree(list(seen.values()))
    sources = []
    for path, (rows, columns) in seen.items():
        inferred = [Column(key, "id")] + [
            Column(c, kinds[c], (s.domain or domains[c]) if kinds[c] == "category" else ())
            for c, s in columns.items()]
        sources.append(Source(source_name(path), path.name, rows, tuple(inferred)))
    return sources


def _read(con: duckdb.DuckDBPyConnection, path: Path, key: str) -> tuple[int, dict[str, _Seen]]:
    """The rows of the file at `path` and what its values say about each column but the key."""
    try:
        header, _ = read_header(path, SourceSchema(path.stem, path.name, (), ""))
    except SourceFileError as exc:
        raise fail(str(exc)) from None
    if len(header) == 1:  # one column, or another delimiter than the pipeline reads
        _same_delimiter(con, path)
    for column in header:
        if not _NAME.match(column):
            raise fail(f"{path}: column {column!r} cannot be declared ({_NAME_RULE}); rename it "
                       "in the header")
    if key not in header:
        raise fail(f"{path}: no key column '{key}' (header: {', '.join(header)[:200]}); every "
                   "file carries the key")
    sniffed = _sniff(con, path, header)
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE raw_rows AS SELECT * FROM {READ_CSV}",
                    read_csv_params(path, header))
    except duckdb.Error as exc:
        raise fail(f"{path}: DuckDB cannot read it as CSV: {_first_line(exc)}") from None
    columns = [c for c in header if c != key]
    rows = con.execute("SELECT count(*) FROM raw_rows").fetchone()[0]
    if rows == 0:
        raise fail(f"{path}: has a header but no data rows: nothing to infer kinds from")
    figures = con.execute(
        "SELECT " + ", ".join(_figures_sql(c) for c in columns) + " FROM raw_rows").fetchone() \
        if columns else ()
    found: dict[str, _Seen] = {}
    for i, column in enumerate(columns):
        values, ints, money, decimals, dates, distinct = figures[6 * i: 6 * i + 6]
        candidates = _candidates(sniffed[column])
        holds = [k for k, n in (("int", ints), ("money", money), ("decimal", decimals),
                                ("date", dates)) if k in candidates and n == values]
        domain: tuple[str, ...] = ()
        if not holds and 0 < distinct <= CATEGORY_MAX_VALUES \
                and distinct * CATEGORY_MIN_REPEATS <= values:
            domain = _domain(con, column)
            holds = ["category"] if domain else []
        found[column] = _Seen((*holds, "text"), values, domain)
    return rows, found


def _sniff(con: duckdb.DuckDBPyConnection, path: Path, header: list[str]) -> dict[str, str]:
    """DuckDB's sniffed type of each column, read in the pipeline's dialect."""
    try:
        (columns,) = con.execute(
            """SELECT Columns FROM sniff_csv($path, delim = ',', quote = '"', escape = '"',
                   header = true, ignore_errors = true)""", {"path": duckdb_literal(path)}
        ).fetchone()
    except duckdb.Error as exc:
        raise fail(f"{path}: DuckDB cannot read it as CSV: {_first_line(exc)}") from None
    if len(columns) != len(header):
        raise fail(f"{path}: DuckDB reads {len(columns)} columns, its header names "
                   f"{len(header)}")
    return {name: str(c["type"]) for name, c in zip(header, columns, strict=True)}


def _same_delimiter(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Fail when DuckDB's own sniffing finds the fields separated by another character."""
    try:
        delim, found = con.execute(
            "SELECT Delimiter, len(Columns) FROM sniff_csv($path, ignore_errors = true)",
            {"path": duckdb_literal(path)}).fetchone()
    except duckdb.Error:
        return  # the sniff in the pipeline's dialect names the problem
    if delim != "," and found > 1:
        raise fail(f"{path}: its fields are separated by {delim!r}; the pipeline reads "
                   "comma-separated files")


def _candidates(sniffed: str) -> tuple[str, ...]:
    """The kinds the sniffed type allows the values to confirm."""
    if sniffed in _INT_TYPES:
        return _NUMERIC
    if sniffed in ("DOUBLE", "FLOAT") or sniffed.startswith("DECIMAL"):
        return ("money", "decimal")
    return ("date",) if sniffed == "DATE" else ()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _figures_sql(column: str) -> str:
    """SQL: values, how many fit int / money / decimal / date, distinct values (etl_norm)."""
    t = f"nullif(trim({_quote(column)}), '')"
    plain = f"NOT regexp_matches({t}, '^[+-]?0[0-9]')"  # no leading zero: not a code
    return ", ".join((
        f"count({t})",
        f"count({t}) FILTER (regexp_full_match({t}, '{INT_PATTERN}') AND {plain} "
        f"AND TRY_CAST({t} AS BIGINT) IS NOT NULL)",
        f"count({t}) FILTER (regexp_full_match({t}, '[+-]?[0-9]+[.][0-9]{{2}}') AND {plain} "
        f"AND TRY_CAST({t} AS DECIMAL(18,2)) IS NOT NULL)",
        f"count({t}) FILTER (regexp_full_match({t}, '{DECIMAL_PATTERN}') AND {plain} "
        f"AND length(regexp_replace({t}, '[^0-9]', '', 'g')) <= {DECIMAL_WRITTEN_DIGITS})",
        f"count({t}) FILTER (regexp_full_match({t}, '{DATE_PATTERN}') "
        f"AND try_strptime({t}, '%Y-%m-%d') IS NOT NULL)",
        f"count(DISTINCT etl_norm({t}))",
    ))


def _domain(con: duckdb.DuckDBPyConnection, column: str) -> tuple[str, ...]:
    """Each distinct value's most frequent spelling (ties: the first in order), sorted; empty
    when a spelling has spaces Python would trim (the declaration refuses those)."""
    t = f"nullif(trim({_quote(column)}), '')"
    rows = con.execute(
        f"""SELECT v FROM (
                SELECT v, row_number() OVER (PARTITION BY etl_norm(v) ORDER BY n DESC, v) AS k
                FROM (SELECT v, count(*) AS n FROM (SELECT {t} AS v FROM raw_rows)
                      WHERE v IS NOT NULL GROUP BY v))
            WHERE k = 1""").fetchall()
    values = sorted(v for (v,) in rows)
    return tuple(values) if all(v == v.strip() for v in values) else ()


def _agree(files: list[tuple[int, dict[str, _Seen]]]) -> tuple[dict[str, str],
                                                                 dict[str, tuple[str, ...]]]:
    """One kind per column name, the first that holds in every file with a value in it; and
    the first such file's domain, for a file where a category column is empty."""
    votes: dict[str, list[_Seen]] = {}
    for _, columns in files:
        for name, seen in columns.items():
            votes.setdefault(name, []).append(seen)
    kinds, domains = {}, {}
    for name, seen in votes.items():
        voting = [s for s in seen if s.values] or [_Seen(("text",), 0, ())]
        kinds[name] = next(k for k in PREFERENCE if all(k in s.holds for s in voting))
        domains[name] = voting[0].domain
    return kinds, domains


def _scalar(value: str) -> str:
    """`value` as a YAML flow scalar that reads back as exactly this text."""
    return _flow([value])[1:-1]


def _flow(values: Sequence[str]) -> str:
    return yaml.safe_dump(list(values), default_flow_style=True, allow_unicode=True,
                          width=1 << 30).strip()


def render(sources: Sequence[Source], key: str) -> str:
    """The declaration's text: the format of etl_assets/customers.yaml, with comments."""
    shared: dict[str, list[str]] = {}
    for s in sources:
        for c in s.columns:
            if c.name != key:
                shared.setdefault(c.name, []).append(s.name)
    shared = {c: names for c, names in shared.items() if len(names) > 1}
    out = [
        f"# A declaration inferred by `etl-assets init` from {len(sources)} CSV "
        f"file{'s' * (len(sources) != 1)}: yours to edit.",
        "# Kinds come from the values: check each one, add ranges (min, max), mark columns that",
        "# may not be empty (required: true), review each category's domain, add derived columns.",
        "# The format: docs/rules.md and etl_assets/lib/declaration.py.",
        "",
        "# The join column every source carries: the rows of all files are merged on it.",
        f"key: {_scalar(key)}",
        "",
        "# One source per CSV file of the data folder: its file and columns, each of a kind",
        f"# ({', '.join(KINDS)}). A number may take min and max, any",
        "# column required: true; a category's domain lists its values (others are rejected).",
        "sources:",
    ]
    for s in sources:
        out += [f"  {_scalar(s.name)}:", f"    file: {_scalar(s.filename)}",
                f"    # description: what {s.filename} holds ({s.rows} rows when inferred)",
                "    columns:"]
        for c in s.columns:
            out += _column_lines(c)
    out += ["", "# Which source's value wins a column several sources carry: without an entry,",
            "# the first source with a value, in the order above."]
    if shared:
        listed = "; ".join(f"{c} ({', '.join(names)})" for c, names in shared.items())
        out += textwrap.wrap(f"Carried by several: {listed}.", _LINE_WIDTH - 2,
                             initial_indent="# ", subsequent_indent="#   ")
    out += ["prefer: {}", "",
            "# Shared DuckDB macros for the derived columns, e.g.",
            "#   per_unit: {params: [amount, units], sql: CASE WHEN units > 0 THEN amount / units END}",
            "macros: {}", "",
            "# Columns computed over the merged row: name: a DuckDB SQL expression over the key",
            "# and the sources' columns. The export: the key, each source's columns, these.",
            "derived: {}", ""]
    return "\n".join(out)


def _column_lines(c: Column) -> list[str]:
    if c.kind != "category":
        return [f"      {_scalar(c.name)}: {{kind: {c.kind}}}"]
    line = f"      {_scalar(c.name)}: {{kind: category, domain: {_flow(c.domain)}}}"
    if len(line) <= _LINE_WIDTH:
        return [line]
    return [f"      {_scalar(c.name)}:", "        kind: category", "        domain:",
            *(f"          - {_scalar(v)}" for v in c.domain)]


def init(data_dir: str | Path, key: str, out: str | Path, force: bool = False) -> list[Source]:
    """Infer the declaration of `data_dir`, check it with the loader, write it to `out`."""
    target = Path(out)
    if target.exists() and not force:
        raise fail(f"{target}: exists; --force replaces it")
    if target.is_dir():
        raise fail(f"{target}: is a directory")
    sources = infer(data_dir, key)
    text = render(sources, key)
    try:
        declaration_file.check(declaration_file.parse(text, str(target)), ENGINE_MACROS)
    except SettingsError as exc:  # a name the format refuses (an SQL keyword, ...)
        raise fail(f"{exc} (as inferred from {data_dir}: rename that file or column; nothing "
                   "written)") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return sources


def summary(sources: Iterable[Source]) -> list[str]:
    """One line per source: its file and each column's kind (a category's value count)."""
    lines = []
    for s in sources:
        kinds = ", ".join(f"{c.name} {c.kind}" + (f" ({len(c.domain)} values)" if c.domain
                                                   else "") for c in s.columns)
        lines.append(f"{s.name} ({s.filename}, {s.rows} rows): {kinds}")
    return lines


def _first_line(exc: BaseException) -> str:
    """DuckDB's reason on one line: its first line without the error's class, or, when that
    line only says which file it was sniffing, the next."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Error when sniffing file" in lines[0]:
        return lines[1]
    text = lines[0] if lines else type(exc).__name__
    return re.sub(r"^[A-Za-z ]*Error: ", "", text)
