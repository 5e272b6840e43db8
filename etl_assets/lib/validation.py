"""Reading a source CSV into DuckDB and sorting every row into accepted or rejected.

File-level problems raise `SourceFileError` with one line naming the file. Row-level problems
never raise: the row goes to the rejected set with a reason, so rows read = accepted + rejected.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from etl_assets.lib.paths import duckdb_literal
from etl_assets.lib.schema import (
    MAX_FIELD_BYTES,
    MAX_LINE_BYTES,
    Column,
    SourceSchema,
)

if TYPE_CHECKING:  # staging hashes its files with file_sha256, defined here
    pass

INT_PATTERN = "[+-]?[0-9]+"
DECIMAL_PATTERN = r"[+-]?([0-9]+([.][0-9]*)?|[.][0-9]+)"
DATE_PATTERN = "[0-9]{4}-[0-9]{2}-[0-9]{2}"
INVALID_UTF8 = "invalid_utf8"
MAX_RAW_LINE = 1 << 20


def duplicate_reason(key: str) -> str:
    """A valid row superseded by a later one with the same key (`duplicate_customer_id`)."""
    return f"duplicate_{key}"


def missing_reason(key: str) -> str:
    """A row with no key (`missing_customer_id`)."""
    return f"missing_{key}"


def invalid_reason(key: str) -> str:
    """A row whose key breaks the id rule (`invalid_customer_id`)."""
    return f"invalid_{key}"


# The shipped pipeline's reasons (key customer_id).
DUPLICATE = duplicate_reason("customer_id")
MISSING_ID = missing_reason("customer_id")
INVALID_ID = invalid_reason("customer_id")
_REASON_BY_KIND = {
    "int": "invalid_integer",
    "decimal": "invalid_decimal",
    "money": "invalid_decimal",
    "date": "invalid_date",
    "category": "invalid_category",
}


class SourceFileError(RuntimeError):
    """A source file that cannot be read at all; str() is one line naming the file."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class ReadReport:
    """What reading one source produced (tables `accepted` and `rejected` hold the rows)."""

    rows_read: int
    accepted: int
    rejected: int
    reasons: Counter = field(default_factory=Counter)
    extra_columns: list[str] = field(default_factory=list)
    # The reason of a superseded duplicate (the source's key), which is not bad data.
    superseded: str = DUPLICATE

    @property
    def invalid(self) -> int:
        """Rejected rows that are bad data (superseded duplicates are not)."""
        return self.rejected - self.reasons.get(self.superseded, 0)

    @property
    def invalid_fraction(self) -> float:
        return self.invalid / self.rows_read if self.rows_read else 0.0

    @property
    def top_reason(self) -> str | None:
        """The most common reason a row was invalid (ties: alphabetical)."""
        bad = sorted((-n, r) for r, n in self.reasons.items() if r != self.superseded)
        return bad[0][1] if bad else None


def read_header(path: Path, schema: SourceSchema) -> tuple[list[str], list[str]]:
    """Return (columns in file order, extra columns); SourceFileError for unusable files."""
    if not path.is_file():
        raise SourceFileError(path, "file not found")
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    if not head.strip():
        raise SourceFileError(path, "file is empty (expected a header line)")
    # Only the header must decode: a bad byte in a data row is that row's problem (quarantined
    # as invalid_utf8), not the file's.
    header = head.split(b"\n", 1)[0]
    try:
        text = codecs.decode(header, "utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceFileError(path, f"header is not valid UTF-8 (byte offset {exc.start})") from None
    first_line = text.splitlines()[0] if text else ""
    columns = [c.strip() for c in next(csv.reader([first_line]))]
    duplicates = sorted(c for c, n in Counter(columns).items() if n > 1)
    if duplicates:
        raise SourceFileError(path, f"duplicate column(s) in header: {', '.join(duplicates)}")
    missing = [c for c in schema.column_names if c not in columns]
    if missing:
        raise SourceFileError(
            path, f"missing required column(s): {', '.join(missing)} (header: {first_line[:200]})"
        )
    extra = [c for c in columns if c not in schema.column_names]
    return columns, extra


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


_PATTERN_BY_KIND = {"int": INT_PATTERN, "decimal": DECIMAL_PATTERN, "money": DECIMAL_PATTERN,
                    "date": DATE_PATTERN}


def _shape_expr(col: Column) -> str | None:
    """SQL: does the trimmed text `v_<name>` have the shape of its kind (column `m_<name>`)?

    Computed once per value and read by the typed value and by the checks: the same regular
    expression, evaluated in up to three places, was the largest part of validation
    (docs/performance.md#sources).
    """
    pattern = _PATTERN_BY_KIND.get(col.kind)
    return None if pattern is None else f"regexp_full_match(v_{col.name}, '{pattern}')"


def _typed_expr(col: Column) -> str:
    """SQL for the typed value of `col` from its trimmed text `v_<name>` (NULL if it won't parse)."""
    v = f"v_{col.name}"
    def when_it_matches(value: str) -> str:
        return f"CASE WHEN m_{col.name} THEN {value} END"

    if col.kind == "int":
        return when_it_matches(f"TRY_CAST({v} AS BIGINT)")
    if col.kind == "decimal":
        # IEEE: -0.0 + 0.0 is +0.0, so "-0" is stored (and exported) as 0, not -0.0.
        return when_it_matches(f"TRY_CAST({v} AS {col.sql_type}) + 0.0")
    if col.kind == "money":
        return when_it_matches(f"TRY_CAST({v} AS {col.sql_type})")
    if col.kind == "date":
        return when_it_matches(f"CAST(try_strptime({v}, '%Y-%m-%d') AS DATE)")
    if col.kind == "category":
        # Canonical spelling of the domain value that matches after normalization. A value
        # spelled canonically is its own answer (no two domain values normalize alike: see
        # normalized()), without the normalizing regex (docs/performance.md#sources).
        return (
            f"CASE WHEN list_contains($domain_{col.name}, {v}) THEN {v} "
            f"ELSE list_extract($domain_{col.name}, list_position($normalized_{col.name}, "
            f"etl_norm({v}))) END"
        )
    if col.kind == "id":
        return v
    # Text keeps its spaces; blank is NULL. v_<name> is NULL exactly when the trimmed text is
    # empty (or the value missing), so the value is not trimmed a second time.
    return f"CASE WHEN {v} IS NULL THEN NULL ELSE {_quote(col.name)} END"


def _significant_digits(v: str) -> str:
    """SQL: digits of the plain decimal `v` from its first to its last significant one.

    Leading zeros and trailing zeros after the point do not count ("0.0120" has 2; "1200" has 4:
    an integer's zeros are digits written).
    """
    unpadded = f"CASE WHEN contains({v}, '.') THEN rtrim({v}, '0') ELSE {v} END"
    return f"length(ltrim(replace(ltrim({unpadded}, '+-'), '.', ''), '0'))"


def _value_checks(col: Column) -> list[str]:
    """The CASE branches that reject a bad value of `col`, most specific first."""
    v, reason = f"v_{col.name}", _REASON_BY_KIND.get(col.kind)
    checks: list[str] = []
    if col.kind in ("int", "decimal", "money"):
        if col.significant_digits is not None:
            # Before the cast check: a 400-digit number casts to inf. A value of at most that
            # many characters cannot have more digits; the inner CASE skips counting for it
            # (an AND would count every row's digits: docs/performance.md#sources).
            n = col.significant_digits
            checks.append(
                f"WHEN CASE WHEN length({v}) > {n} THEN m_{col.name} "
                f"AND {_significant_digits(v)} > {n} END "
                f"THEN 'too_many_digits({col.name})'"
            )
        # A well-formed number that its type cannot hold (past BIGINT, 17+ digits of money).
        checks.append(
            f"WHEN m_{col.name} AND {col.name} IS NULL THEN 'out_of_range({col.name})'"
        )
    if reason:
        checks.append(f"WHEN {v} IS NOT NULL AND {col.name} IS NULL THEN '{reason}({col.name})'")
    if col.decimals is not None:
        # The cast rounds; a non-zero digit past the allowed decimals must not be rounded away.
        checks.append(
            f"WHEN regexp_matches({v}, '[.][0-9]{{{col.decimals}}}[0-9]*[1-9]') "
            f"THEN 'too_many_decimals({col.name})'"
        )
    return checks


def _trimmed(v: str) -> str:
    """SQL: `v` trimmed of Unicode spaces (Zs) at both ends, as trim() does; NULL when empty.

    trim() decodes every character of every value (a large part of the validation query:
    docs/performance.md#sources); an ASCII value that neither starts nor ends with a space is
    already trimmed, and three byte tests say so (strlen counts bytes, length characters).
    """
    return (f"CASE WHEN strlen({v}) > 0 AND NOT prefix({v}, ' ') AND NOT suffix({v}, ' ') "
            f"AND strlen({v}) = length({v}) THEN {v} ELSE nullif(trim({v}), '') END")


def normalized(con: duckdb.DuckDBPyConnection, values: tuple[str, ...]) -> list[str]:
    """The values as the etl_norm rule normalizes them (computed once, not per row).

    Two values that normalize alike would make the canonical spelling of the second one
    unreachable, and the validation's shortcut for canonical values wrong: refused here.
    """
    result = [con.execute("SELECT etl_norm(?)", [v]).fetchone()[0] for v in values]
    if len(set(result)) != len(result):
        raise ValueError(f"domain values normalize alike: {values}")
    return result


def validation_sql(
    con: duckdb.DuckDBPyConnection, schema: SourceSchema
) -> tuple[str, dict[str, object]]:
    """SQL creating temp table `checked` from `raw_rows`, and its bound parameters.

    `checked` has rec (0-based record index = raw_rows.rowid), the typed columns, reason (NULL
    when valid) and row_hash (md5 of the raw values).
    """
    select, params = checked_select(con, schema, "SELECT rowid AS rec, * FROM raw_rows")
    return f"CREATE OR REPLACE TEMP TABLE checked AS {select}", params


def checked_select(
    con: duckdb.DuckDBPyConnection, schema: SourceSchema, rows_sql: str
) -> tuple[str, dict[str, object]]:
    """The one validation query: rec, the typed columns, row_hash and reason (NULL when
    valid) of each row of `rows_sql` (raw text columns plus `rec`), and its bound parameters."""
    params: dict[str, object] = {}
    # The key goes through the one id rule (rules.etl_customer_id); other values are trimmed.
    trimmed = ", ".join(
        f"etl_customer_id({_quote(c.name)}) AS v_{c.name}" if c.kind == "id"
        else f"{_trimmed(_quote(c.name))} AS v_{c.name}"
        for c in schema.columns
    )
    typed = ", ".join(f"{_typed_expr(c)} AS {c.name}" for c in schema.columns)
    checks: list[str] = [
        f"WHEN v_{schema.key} IS NULL THEN '{missing_reason(schema.key)}'",
        f"WHEN etl_customer_id_invalid(v_{schema.key}) THEN '{invalid_reason(schema.key)}'",
        *(f"WHEN strlen(v_{c.name}) > $max_field_bytes THEN 'field_too_long({c.name})'"
          for c in schema.columns),
    ]
    params["max_field_bytes"] = MAX_FIELD_BYTES
    for col in schema.data_columns:
        if col.required:
            checks.append(f"WHEN v_{col.name} IS NULL THEN 'missing({col.name})'")
        checks += _value_checks(col)
        if col.kind == "category":
            params[f"domain_{col.name}"] = list(col.domain)
            params[f"normalized_{col.name}"] = normalized(con, col.domain)
        if col.min is not None:
            params[f"min_{col.name}"] = col.min
            checks.append(f"WHEN {col.name} < $min_{col.name} THEN 'out_of_range({col.name})'")
        if col.max is not None:
            params[f"max_{col.name}"] = col.max
            checks.append(f"WHEN {col.name} > $max_{col.name} THEN 'out_of_range({col.name})'")
    for left, right in schema.not_greater_than:
        checks.append(f"WHEN {left} > {right} THEN '{left}_exceeds_{right}'")
    raw_values = ", ".join(_quote(c) for c in schema.column_names)
    shaped = [(c.name, _shape_expr(c)) for c in schema.columns if _shape_expr(c) is not None]
    shapes = "".join(f", {expr} AS m_{name}" for name, expr in shaped)
    shape_columns = "".join(f"m_{name}, " for name, _ in shaped)
    sql = f"""
        WITH src AS ({rows_sql}),
        trimmed AS (SELECT *, {trimmed},
                           md5(to_json(list_value({raw_values}))) AS row_hash
                    FROM src),
        shaped AS (SELECT *{shapes} FROM trimmed),
        typed AS (SELECT rec, row_hash, {", ".join("v_" + c.name for c in schema.columns)},
                         {shape_columns}{typed} FROM shaped)
        SELECT rec, {", ".join(schema.column_names)}, row_hash,
               CASE {" ".join(checks)} END AS reason
        FROM typed
    """
    return sql, params


# How every source file is read: all text, the header's columns, malformed records kept aside
# in `csv_rejects` (bound parameters: see read_csv_params).
READ_CSV = """read_csv($path, header = true, auto_detect = false, columns = $columns,
    delim = ',', quote = '"', escape = '"', encoding = 'utf-8', store_rejects = true,
    rejects_table = 'csv_rejects', rejects_scan = 'csv_reject_scans', max_line_size = $max_line)"""


def read_csv_params(path: Path, columns: list[str]) -> dict[str, object]:
    """READ_CSV's parameters for the file at `path` with header `columns`."""
    return {"path": duckdb_literal(path), "columns": {c: "VARCHAR" for c in columns},
            "max_line": MAX_LINE_BYTES}


def read_source(
    con: duckdb.DuckDBPyConnection, path: Path, schema: SourceSchema
) -> ReadReport:
    """Read and validate one source file into temp tables `accepted` and `rejected`.

    accepted: the key, the typed columns, row_hash — one row per key (the last valid row in the
    file wins). rejected: line_number, the key, reason, raw.
    """
    columns, extra = read_header(path, schema)
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE raw_rows AS SELECT * FROM {READ_CSV}",
                    read_csv_params(path, columns))
    except duckdb.OutOfMemoryException:
        raise  # the memory limit's fault, not the file's (named by warehouse.scratch)
    except duckdb.Error as exc:
        raise SourceFileError(path, f"cannot be parsed as CSV: {_first_line(exc)}") from exc

    sql, params = validation_sql(con, schema)
    con.execute(sql, params)
    # Earlier valid rows of a duplicated id are superseded (the last one in the file wins).
    # Most files have no duplicates, so the window runs only over the ids that repeat.
    key = schema.key
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE superseded AS
           SELECT rec FROM (
               SELECT rec, row_number() OVER (PARTITION BY {key} ORDER BY rec DESC) AS k
               FROM checked
               WHERE reason IS NULL AND {key} IN (
                   SELECT {key} FROM checked WHERE reason IS NULL
                   GROUP BY {key} HAVING count(*) > 1))
           WHERE k > 1"""
    )
    con.execute(
        f"""CREATE OR REPLACE TEMP VIEW accepted AS
            SELECT {", ".join(schema.column_names)}, row_hash FROM checked
            WHERE reason IS NULL AND rec NOT IN (SELECT rec FROM superseded)"""
    )
    _build_rejected(con, columns, path, key)
    rows_read, accepted, rejected = con.execute(
        """SELECT (SELECT count(*) FROM checked) + (SELECT count(DISTINCT line) FROM csv_rejects),
                  (SELECT count(*) FROM accepted), (SELECT count(*) FROM rejected)"""
    ).fetchone()
    reasons = Counter(
        dict(con.execute("SELECT reason, count(*) FROM rejected GROUP BY reason").fetchall())
    )
    if rows_read == 0:
        raise SourceFileError(path, "has a header but no data rows")
    return ReadReport(int(rows_read), int(accepted), int(rejected), reasons, extra,
                      duplicate_reason(key))


def _build_rejected(con: duckdb.DuckDBPyConnection, columns: list[str], path: Path,
                    key: str) -> None:
    con.execute(
        """CREATE OR REPLACE TEMP TABLE rejected_recs AS
           SELECT rec, reason FROM checked WHERE reason IS NOT NULL
           UNION ALL SELECT rec, $duplicate FROM superseded""",
        {"duplicate": duplicate_reason(key)},
    )
    # Physical line of a record = header line + records before it + newlines embedded in them.
    # That needs a running sum over the file, computed only when there are rejected rows and
    # some field holds a newline.
    newlines = " + ".join(
        f"coalesce(length({_quote(c)}) - length(replace({_quote(c)}, chr(10), '')), 0)"
        for c in columns
    )
    has_newlines = bool(
        con.execute("SELECT count(*) FROM rejected_recs").fetchone()[0]
        and con.execute(f"SELECT bool_or({newlines} > 0) FROM raw_rows").fetchone()[0]
    )
    preceding_nl = (
        f"""(SELECT rowid AS rec, coalesce(sum({newlines}) OVER (ORDER BY rowid ROWS BETWEEN
               UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before FROM raw_rows)"""
        if has_newlines
        else "(SELECT rec, 0 AS before FROM rejected_recs)"
    )
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE rejected AS
            SELECT 2 + x.rec + p.before AS line_number,
                   etl_customer_id(r.{_quote(key)}) AS {key}, x.reason,
                   CAST(to_json(r) AS VARCHAR) AS raw
            FROM rejected_recs x
            JOIN {preceding_nl} p ON p.rec = x.rec
            JOIN raw_rows r ON r.rowid = x.rec"""
    )
    # Records the CSV reader itself refused (wrong number of fields, ...) do not get a rec
    # number, so every record after them sits one line lower than counted above.
    structural = con.execute(
        # The reader reports a record once per surplus field; one line is one record.
        "SELECT line, min(error_type), min(csv_line), min(line_byte_position) FROM csv_rejects "
        "GROUP BY line ORDER BY line"
    ).fetchall()
    for line, error_type, csv_line, position in structural:
        con.execute("UPDATE rejected SET line_number = line_number + 1 WHERE line_number >= ?", [line])
        if error_type == "INVALID ENCODING":
            # The reader's copy of the line has the bad bytes replaced: keep the file's own
            # bytes instead, escaped (\xff), so the row can be recovered exactly.
            csv_line = _raw_line(path, position)
            reason = INVALID_UTF8
        else:
            reason = f"malformed_row({str(error_type).lower().replace(' ', '_')})"
        key_value = con.execute(
            "SELECT etl_customer_id(?)", [_field(csv_line or "", columns.index(key))]).fetchone()[0]
        con.execute(
            "INSERT INTO rejected VALUES (?, ?, ?, ?)",
            [line, key_value, reason, csv_line],
        )


def _field(record: str, index: int) -> str | None:
    """The key's field (at `index` in the header) of the reader's copy of a record it refused,
    or None. That copy may begin with the line break of an empty line before it, or hold line
    breaks in a value, so it is read as text with its own line breaks; a record too broken to
    read has none."""
    try:
        for row in csv.reader(io.StringIO(record, newline="")):
            if row:
                return row[index] if index < len(row) else None
    except csv.Error:
        pass
    return None


def _raw_line(path: Path, position: int) -> str:
    """The physical line starting at the reader's 1-based byte position, its bytes escaped
    where they are not UTF-8 (at most MAX_RAW_LINE bytes)."""
    with open(path, "rb") as fh:
        fh.seek(max(0, position - 1))
        raw = fh.readline(MAX_RAW_LINE)
    return raw.rstrip(b"\r\n").decode("utf-8", errors="backslashreplace")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
