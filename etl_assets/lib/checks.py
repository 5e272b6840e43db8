"""The blocking checks on `customer_profiles`, defined once: what they compare (the table and
the export against the staged sources themselves, and the export's rows against the table's)
and when each passes.

Two callers, one verdict: the publish audits the table and export it has staged, inside its
transaction, and publishes nothing unless every check passed (`audit`); an unchanged re-run
checks what is published, read-only (`profile_facts`). Both report the same outcomes to Dagster.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb

from etl_assets.lib import freshness, staging, warehouse
from etl_assets.lib.declaration import Declaration
from etl_assets.lib.events import report_progress
from etl_assets.lib.paths import duckdb_literal, duckdb_literals
from etl_assets.lib.rules import DECLARATION
from etl_assets.lib.schema import MAX_LINE_BYTES, SourceSchema, profile_columns
from etl_assets.lib.settings import EtlSettings
from etl_assets.lib.staging import StagedSource
from etl_assets.lib.validation import ReadReport

WH = warehouse.ALIAS


@dataclass(frozen=True)
class CheckOutcome:
    """One check's verdict, with what it compared (the source assets report it to Dagster)."""

    name: str
    passed: bool
    metadata: dict
    description: str | None = None


def source_checks(
    schema: SourceSchema, report: ReadReport, staged: StagedSource,
    settings: EtlSettings,
) -> list[CheckOutcome]:
    """The source's two blocking checks (rows accounted, reject rate) for a read report and
    the version it staged."""
    staged_rows = sum(staged.slice_rows.values())
    return [
        CheckOutcome(
            name="rows_accounted",
            # Rows read from the file = accepted + rejected, and the staged slices (counted
            # from their files) hold exactly the accepted rows: a staging that does not match
            # the read it is recorded for fails here, not silently downstream.
            passed=report.rows_read == report.accepted + report.rejected
            and staged_rows == report.accepted,
            metadata={"read": report.rows_read, "accepted": report.accepted,
                      "rejected": report.rejected, "staged": staged_rows},
        ),
        CheckOutcome(
            name="reject_rate",
            passed=report.invalid_fraction <= settings.max_reject_fraction,
            metadata={
                "invalid": report.invalid,
                "duplicates": report.rejected - report.invalid,
                "read": report.rows_read,
                "fraction": round(report.invalid_fraction, 6),
                "max_fraction": settings.max_reject_fraction,
                "top_reason": report.top_reason or "",
            },
            description=(
                f"{schema.name}: {report.invalid} of {report.rows_read} rows rejected as "
                f"invalid ({report.invalid_fraction:.1%}, limit "
                f"{settings.max_reject_fraction:.1%})"
                + (f", most often {report.top_reason}" if report.top_reason else "")
            ),
        ),
    ]


def profile_check_descriptions(key: str) -> dict[str, str]:
    """name -> description of each check on a pipeline with this key, in the order the checks
    are reported (the Dagster specs read this)."""
    return {
        "row_count_matches_sources":
            f"profiles (table and export) = distinct accepted {key}s across sources",
        f"no_duplicate_{key}": f"each {key} appears once",
        "idempotency_keys_unique": "each idempotency_key appears once",
        "shards_current": "every shard partition was written from the current source data and "
                          "code",
        "export_matches_table":
            "the export's rows, as DuckDB's CSV reader reads them, are the table's (an "
            "order-independent hash of every row)",
    }


# The shipped pipeline's checks.
PROFILE_CHECKS: dict[str, str] = profile_check_descriptions("customer_id")


class NoWarehouseError(RuntimeError):
    """There is no warehouse file to check yet."""


class AuditFailedError(RuntimeError):
    """A blocking check failed on the staged customer_profiles: nothing was published.

    `outcomes` holds every check's verdict, for Dagster to report.
    """

    def __init__(self, outcomes: list[CheckOutcome]) -> None:
        self.outcomes = outcomes
        failed = [o for o in outcomes if not o.passed]
        super().__init__(
            "customer_profiles failed its checks: "
            + "; ".join(f"{o.name} ({o.description})" for o in failed)
            + " (table, export and snapshot left as they were)")


@dataclass(frozen=True)
class ProfileFacts:
    """Counts read from the staged sources, the table and the export, the stale shards, and
    the hash of the table's rows and of the export's (`ROWS_HASH`)."""

    distinct_source_customers: int
    table_rows: int
    distinct_ids: int
    distinct_keys: int
    export_rows: int
    stale_shards: list[int]
    table_hash: str
    export_hash: str
    # The key they were counted on.
    key: str = "customer_id"


def read_facts(settings: EtlSettings, con: duckdb.DuckDBPyConnection,
               export: Callable[[], str | Path]) -> ProfileFacts:
    """What the checks compare, as `con` sees the warehouse (attached as `wh`; inside the
    publish's transaction that is the staged, uncommitted table), and the export's records
    and rows hash, read by DuckDB from the file `export()` names, asked last (in a publish it
    waits for the export being written)."""
    report_progress("checks")
    decl = settings.declaration
    expected = _source_customers(settings, con, staging.current_sources(settings))
    rows, ids, keys, table_hash = _table_counts(con, decl, settings.profiles_table)
    stale = freshness.stale_shards(settings, con)
    export_rows, export_hash = export_facts(con, export(), decl)
    return ProfileFacts(int(expected), rows, ids, keys, export_rows, stale, table_hash,
                        export_hash, decl.key)


def _rows_hash(decl: Declaration) -> str:
    """The aggregate that hashes a relation of customer_profiles' columns: the sum of each
    row's hash (DuckDB's 64-bit hash of every column, in order) as a HUGEINT, so that the
    order of the rows does not matter. The same expression for the table and the export."""
    columns = ", ".join(name for name, _ in profile_columns(decl))
    return f"CAST(coalesce(sum(CAST(hash({columns}) AS HUGEINT)), 0) AS VARCHAR)"


# Each shard's distinct source customers, by the shard's input hash, in the staging folder.
SOURCE_CUSTOMERS = "source_customers.json"


def _source_customers(settings: EtlSettings, con: duckdb.DuckDBPyConnection,
                      staged: dict[str, staging.StagedSource]) -> int:
    """The distinct customer_ids across the staged sources, counted shard by shard.

    Every source routes a customer_id to one shard (etl_shard), so the sources' distinct
    customers are the sum of each shard's (were one routed to two shards, it would count twice
    and the row count check fail), at a tenth of the hash table. A shard's count is a fact of
    its slices alone, so it is kept by the staging code and the shard's input hash
    (staging.shard_input_hash, from the slices' contents), and counted again only for a shard
    whose slices changed: a one-row change counts one shard, not every source's every row.
    """
    memo = Path(settings.staging_dir) / SOURCE_CUSTOMERS
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    counts: dict[str, int] = {}
    total = 0
    for shard_id in settings.shard_ids:
        # The staging code is part of the key: a new id rule may count the same slices apart.
        key = f"{freshness.staging_key(settings)}:{staging.shard_input_hash(staged, shard_id)}"
        count = known.get(key)
        if not isinstance(count, int):
            files = [f for source in staged.values()
                     for f in staging.slices_to_read(source, shard_id)]
            count = int(con.execute(
                f"SELECT count(DISTINCT {settings.declaration.key}) FROM read_parquet($paths)",
                {"paths": duckdb_literals(files)}).fetchone()[0])
        counts[key] = count
        total += count
    if counts != known:
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(counts, sort_keys=True), encoding="utf-8")
            os.replace(tmp, memo)
        except OSError:
            # Only a memo: the next check counts again (and a read-only folder refuses the
            # unlink as it refused the write).
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return total


def _table_counts(con: duckdb.DuckDBPyConnection, decl: Declaration,
                  table: str) -> tuple[int, int, int, str]:
    """customer_profiles' rows, distinct customer_ids and distinct idempotency keys, and the
    hash of its rows (`_rows_hash`), in one scan.

    Distinct 8-byte hashes are counted, not the text: equal values hash alike, so as many
    distinct hashes as rows proves the values distinct; fewer (a duplicate, or two values
    sharing a hash) is settled by counting the text. The keys are counted only if needed: a
    key is its customer_id, ':' and a 32-character md5 (rules.merge_sql), so when every row's
    key has that shape and the ids are distinct, the keys are too (a key names its id). One
    set of hashes at a time, to halve the peak (docs/performance.md#shards-and-the-publish).
    """
    key = decl.key
    rows, ids, odd_keys, rows_hash = con.execute(
        f"""SELECT count(*),
                   count(DISTINCT hash({key})) FILTER (WHERE {key} IS NOT NULL),
                   count(*) FILTER (WHERE NOT coalesce(
                       starts_with(idempotency_key, {key} || ':')
                       AND length(idempotency_key) = length({key}) + 33, false)),
                   {_rows_hash(decl)}
            FROM {WH}.{table}""").fetchone()
    rows, ids = int(rows), _exact_distinct(con, table, key, int(ids), int(rows))
    if odd_keys == 0 and ids == rows:
        return rows, ids, rows, rows_hash
    keys = int(con.execute(
        f"""SELECT count(DISTINCT hash(idempotency_key)) FILTER (WHERE idempotency_key IS NOT NULL)
            FROM {WH}.{table}""").fetchone()[0])
    return rows, ids, _exact_distinct(con, table, "idempotency_key", keys, rows), rows_hash


def _exact_distinct(con: duckdb.DuckDBPyConnection, table: str, column: str, hashed: int,
                    rows: int) -> int:
    """The distinct values of `column`: `hashed` (its distinct hashes) when that equals `rows`,
    else counted on the text."""
    if hashed == rows:
        return hashed
    return int(con.execute(
        f"SELECT count(DISTINCT {column}) FROM {WH}.{table}").fetchone()[0])


def export_facts(con: duckdb.DuckDBPyConnection, path: str | Path,
                 decl: Declaration = DECLARATION) -> tuple[int, str]:
    """The records of the CSV at `path` and the hash of its rows (`_rows_hash`), in one read
    by DuckDB's CSV reader with customer_profiles' column types: the values a user reading
    the export gets (a quoted empty value is an empty string, an unquoted one NULL, as
    DuckDB's writer wrote them)."""
    rows, rows_hash = con.execute(
        f"""SELECT count(*), {_rows_hash(decl)}
            FROM read_csv($path, header = true, delim = ',', quote = '"', escape = '"',
                          columns = $columns, allow_quoted_nulls = false,
                          max_line_size = $max_line)""",
        {"path": duckdb_literal(str(path)), "columns": dict(profile_columns(decl)),
         "max_line": MAX_LINE_BYTES}).fetchone()
    return int(rows), rows_hash


def published_facts(settings: EtlSettings, con: duckdb.DuckDBPyConnection) -> ProfileFacts:
    """The facts of the published table and export, as `con` sees them."""
    return read_facts(settings, con, lambda: settings.export_path)


def profile_facts(settings: EtlSettings) -> ProfileFacts:
    """The facts of what is published, in one read-only pass over the warehouse.

    Read-only: a user's read-only connection to the warehouse does not block the checks.
    """
    with warehouse.read_only(settings.database, settings.lock_timeout_s,
                             settings.duckdb_limits) as con:
        if con is None:
            raise NoWarehouseError(f"{settings.database}: no warehouse yet; "
                                   "materialize customer_profiles first")
        return published_facts(settings, con)


def profile_checks(facts: ProfileFacts, shard_count: int) -> list[CheckOutcome]:
    """The verdict of each check on `facts`: the one definition of when each passes."""
    rows, expected, export_rows = facts.table_rows, facts.distinct_source_customers, facts.export_rows
    stale = facts.stale_shards
    duplicates = rows - facts.distinct_ids
    key = facts.key
    return [
        CheckOutcome(
            "row_count_matches_sources", rows == expected == export_rows,
            {"table_rows": rows, "export_rows": export_rows, "distinct_source_customers": expected},
            f"table {rows}, export {export_rows}, distinct source customers {expected}"),
        CheckOutcome(
            f"no_duplicate_{key}", duplicates == 0,
            {"rows": rows, f"distinct_{key}s": facts.distinct_ids, "duplicates": duplicates},
            f"{duplicates} duplicate {key} row(s)"),
        CheckOutcome(
            "idempotency_keys_unique", rows == facts.distinct_keys,
            {"rows": rows, "distinct_keys": facts.distinct_keys},
            f"{rows} rows, {facts.distinct_keys} distinct idempotency keys"),
        CheckOutcome(
            "shards_current", not stale,
            {"shards": shard_count, "stale_or_missing": ", ".join(map(str, stale))},
            f"stale or missing shards: {stale}" if stale else "all shards current"),
        CheckOutcome(
            "export_matches_table", facts.table_hash == facts.export_hash,
            {"table_rows_hash": facts.table_hash, "export_rows_hash": facts.export_hash},
            "the export's rows are the table's" if facts.table_hash == facts.export_hash
            else "the export's rows differ from the table's"),
    ]


def raise_if_failed(outcomes: list[CheckOutcome]) -> list[CheckOutcome]:
    """`outcomes`, or AuditFailedError if any check failed."""
    if not all(o.passed for o in outcomes):
        raise AuditFailedError(outcomes)
    return outcomes


def auditor(settings: EtlSettings) -> tuple[list[CheckOutcome], Callable[
        [duckdb.DuckDBPyConnection, Callable[[], Path]], None]]:
    """(outcomes, audit): `audit(con, export)` runs the checks on the staged table and export
    inside the publish's transaction, records their outcomes in `outcomes` and raises
    AuditFailedError if any failed (the publish then rolls back). `export()` waits for the
    staged export to be written and names its file."""
    outcomes: list[CheckOutcome] = []

    def audit(con: duckdb.DuckDBPyConnection, export: Callable[[], Path]) -> None:
        outcomes[:] = profile_checks(read_facts(settings, con, export), settings.shard_count)
        raise_if_failed(outcomes)

    return outcomes, audit
