"""The declaration format: a pipeline's domain in one YAML file, as frozen dataclasses.

    key: customer_id                  # the join column every source carries (the id rule)
    sources:                          # name -> file, description, columns, not_greater_than
      billing:
        file: billing.csv
        columns:
          customer_id: {kind: id}
          mrr: {kind: money, min: 0}  # kind; optional min, max, domain, required
    prefer: {email: [crm, billing]}   # who wins a column several sources carry
    macros: {name: {params: [x], sql: ...}}   # shared DuckDB macros
    derived: {name: SQL expression}   # over the merged columns
    export: [customer_id, ...]        # optional column order

`declaration_file.load(path, engine_macros)` reads one (its structure checked there, its SQL
by `declaration_sql`, with DuckDB) or raises `SettingsError` (the CLI's exit 2) with one line
naming the file, the line and the field (`Document.fail`):

    customers.yaml:21: sources.billing.columns.mrr.kind: unknown kind 'moneyy' (one of id, ...)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

# The declaration the package ships: the customer pipeline.
SHIPPED = Path(__file__).resolve().parent.parent / "customers.yaml"

Kind = Literal["id", "text", "int", "decimal", "money", "date", "category"]
KINDS: tuple[str, ...] = ("id", "text", "int", "decimal", "money", "date", "category")
NUMERIC_KINDS = ("int", "decimal", "money")

# How precise each numeric kind is. A value beyond its kind's precision is rejected, never
# rounded: money keeps at most MONEY_DECIMALS decimals (trailing zeros aside), a decimal at most
# DECIMAL_DIGITS significant digits (a double holds any 15-digit decimal exactly as written),
# an integer must fit BIGINT.
MONEY_DECIMALS = 2
DECIMAL_DIGITS = 15

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

# Columns the engine adds beside a source's (validation) or a profile's (the merge): a declared
# name must not take one. `ids` and `merged` name relations of the merge query.
ENGINE_COLUMNS = ("rec", "row_hash", "reason", "shard_id", "idempotency_key")
ENGINE_RELATIONS = ("ids", "merged")

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Column:
    """One source column: its kind, optional inclusive range, and domain for categoricals."""

    name: str
    kind: Kind
    min: float | None = None
    max: float | None = None
    domain: tuple[str, ...] = ()
    required: bool = False

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
    """A source file: its asset name, file name, columns (the key first), what it describes,
    and its cross-column rules: (left, right) pairs meaning left <= right."""

    name: str
    filename: str
    columns: tuple[Column, ...]
    description: str
    not_greater_than: tuple[tuple[str, str], ...] = ()

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def key(self) -> str:
        """The key column (of kind id, always the first)."""
        return self.columns[0].name

    @property
    def data_columns(self) -> tuple[Column, ...]:
        """Every column but the key."""
        return tuple(c for c in self.columns if c.kind != "id")


@dataclass(frozen=True)
class Macro:
    """A shared DuckDB macro: `name(params)` is `sql`."""

    name: str
    params: tuple[str, ...]
    sql: str

    @property
    def create_sql(self) -> str:
        # The body on lines of its own: a trailing `-- comment` in it ends before the paren.
        return (f"CREATE OR REPLACE TEMP MACRO {self.name}({', '.join(self.params)}) AS (\n"
                f"{self.sql}\n)")


@dataclass(frozen=True)
class Derived:
    """A derived column: a DuckDB expression over the merged columns, and its SQL type."""

    name: str
    sql: str
    sql_type: str = ""

    @property
    def select_sql(self) -> str:
        """The column in a SELECT list (the one spelling the check and the merge use)."""
        return f"(\n{self.sql}\n) AS {self.name}"


@dataclass(frozen=True)
class Declaration:
    """A checked declaration (see the module docstring); `derived` carries DuckDB's types."""

    path: str
    key: str
    sources: tuple[SourceSchema, ...]
    # Every column more than one source carries -> its sources, the preferred first.
    prefer: tuple[tuple[str, tuple[str, ...]], ...]
    macros: tuple[Macro, ...]
    derived: tuple[Derived, ...]
    export: tuple[str, ...]

    def merged_columns(self) -> list[tuple[str, str]]:
        """(name, SQL type) of the merged row before derivation: the key, then each source's
        columns in declaration order (a shared column where it first appears)."""
        seen: dict[str, str] = {self.key: SQL_TYPES["id"]}
        for source in self.sources:
            for col in source.data_columns:
                seen.setdefault(col.name, col.sql_type)
        return list(seen.items())

    def column_types(self) -> dict[str, str]:
        """Every exported column's SQL type, merged and derived."""
        return dict(self.merged_columns()) | {d.name: d.sql_type for d in self.derived}

    def carriers(self, column: str) -> tuple[str, ...]:
        """The sources that carry `column`, the preferred first."""
        preferred = dict(self.prefer)
        if column in preferred:
            return preferred[column]
        return tuple(s.name for s in self.sources if column in s.column_names)

    def _canonical(self, whole: bool) -> dict[str, Any]:
        # Descriptions only document: editing one recomputes nothing.
        sources = [{"name": s.name, "file": s.filename, "not_greater_than": s.not_greater_than,
                    "columns": [[c.name, c.kind, c.min, c.max, c.domain, c.required]
                                for c in s.columns]} for s in self.sources]
        if not whole:
            return {"key": self.key, "sources": sources}
        return {"key": self.key, "sources": sources, "prefer": self.prefer,
                "macros": [[m.name, m.params, m.sql] for m in self.macros],
                "derived": [[d.name, d.sql] for d in self.derived], "export": self.export}

    @property
    def digest(self) -> str:
        """sha256 of everything that shapes a profile row: a part of the shards' code version."""
        return _sha256(self._canonical(whole=True))

    @property
    def sources_digest(self) -> str:
        """sha256 of the key and the sources' columns: what validation and staging follow."""
        return _sha256(self._canonical(whole=False))


def _sha256(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def field_name(path: Path_) -> str:
    """`sources.billing.columns.mrr.kind`, `export[2]`: a field as a user finds it."""
    text = ""
    for part in path:
        if isinstance(part, str) and not part.isprintable():
            part = repr(part)  # a name with a line break must not break the one line
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


class Document:
    """A parsed declaration file: its data, each field's line, and the one way to fail on it."""

    def __init__(self, name: str, data: object, lines: dict[Path_, int]):
        self.name, self.data, self.lines = name, data, lines

    def fail(self, path: Path_, problem: str) -> NoReturn:
        """Raise the one-line error `<file>:<line>: <field>: <problem>`."""
        line = next((self.lines[path[:n]] for n in range(len(path), 0, -1)
                     if path[:n] in self.lines), None)
        where = f"{self.name}:{line}" if line else self.name
        raise error(f"{where}: {field_name(path)}: {problem}" if path else f"{where}: {problem}")


def error(message: str) -> Exception:
    """A declaration's problem as the CLI's configuration error (SettingsError: exit 2)."""
    # settings imports schema, which loads the shipped declaration through this module: the
    # class is taken when a declaration fails, once settings is whole.
    from etl_assets.lib.settings import SettingsError

    return SettingsError(message)
