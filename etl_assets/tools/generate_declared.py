"""Synthetic data for any declaration (`etl-assets generate --pipeline FILE`): one CSV file per
source, from each column's kind, range and domain, byte-identical for the same seed.

Keys: `rows` of them, `<key without _id>_00000001`, ...; unique in each source. SHARED of them
are in every source, each other one in a single source (key 1 in all, so that no source is
empty): the join meets matches and gaps. Each file's rows come shuffled.

Values (every one valid, so validation accepts every row):
- int, decimal, money: uniform within [min, max] (0..1000 where neither is declared, DEFAULT_SPAN
  from the one declared); decimal and money on a grid of cents (money written `12.50`);
- date: up to DATE_SPAN_DAYS days before `generate.ANCHOR`;
- category: the domain's values as declared; text: company-like names with commas,
  ampersands and non-ASCII letters, which must survive the CSV round trip;
- a column that is not required is empty in EMPTY of the rows;
- each `not_greater_than` pair holds: the right side is raised to the left's minimum where
  below it, then the left lowered to the right where above it.
A range no value of the kind fits, or rules that cannot hold together, is one line (exit 2).

Without --pipeline, `generate` is the customer domain's own generator (tools/generate.py): its
output is the shipped sample's, byte for byte.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from etl_assets.lib import declaration_file
from etl_assets.lib.declaration import Column, Declaration, SourceSchema
from etl_assets.lib.settings import SettingsError
from etl_assets.tools.generate import ANCHOR, CHUNK_ROWS, LISTS, chunked_files

SHARED = 0.8
EMPTY = 0.03
DEFAULT_SPAN = 1000
DATE_SPAN_DAYS = 1500
# Generated numbers stay within ±LIMIT units (a decimal or money value: cents), which keeps a
# decimal within its 15 digits and money within DECIMAL(18,2).
LIMIT = 10**15

# Each kind's unit: cents for decimal and money, else 1.
_SCALE = {"int": 1, "decimal": 100, "money": 100, "date": 1}
_MONEY_TEXT = ("printf('%s%d.%02d', CASE WHEN {v} < 0 THEN '-' ELSE '' END, abs({v}) // 100, "
               "abs({v}) % 100)")


def load(path: str | Path) -> Declaration:
    """The declaration at `path`, checked as every declaration is (SettingsError: exit 2)."""
    from etl_assets.lib.rules import ENGINE_MACROS

    return declaration_file.load(path, ENGINE_MACROS)


def _where(decl: Declaration, source: SourceSchema, column: str) -> str:
    return f"{decl.path}: sources.{source.name}.columns.{column}"


def bounds(decl: Declaration, source: SourceSchema, col: Column) -> tuple[int, int]:
    """The inclusive range of `col`'s generated values, in its unit (cents, days, 1)."""
    if col.kind == "date":
        return -DATE_SPAN_DAYS, 0
    scale = _SCALE[col.kind]
    lo = hi = None
    # Validation compares a value as a double with the bound: k cents is in range when the
    # double nearest k/100 (Python's k / 100, DuckDB's reading of its text) is. So -0.3 is
    # -30 cents, though the double -0.3 lies a little above the rational -3/10.
    if col.min is not None:
        lo = math.ceil(Fraction(col.min) * scale)
        while (lo - 1) / scale >= col.min:
            lo -= 1
    if col.max is not None:
        hi = math.floor(Fraction(col.max) * scale)
        while (hi + 1) / scale <= col.max:
            hi += 1
    span = DEFAULT_SPAN * scale
    if lo is None:
        lo = 0 if hi is None else hi - span
    if hi is None:
        hi = lo + span
    lo, hi = max(lo, -LIMIT), min(hi, LIMIT)
    if lo > hi:
        raise SettingsError(f"{_where(decl, source, col.name)}: no {col.kind} value to generate "
                            f"between min {col.min} and max {col.max}")
    return lo, hi


def _to_cents(values: np.ndarray | int, kind: str) -> np.ndarray | int:
    return values * (100 // _SCALE[kind]) if kind != "date" else values


def _from_cents(values: np.ndarray, kind: str, up: bool) -> np.ndarray:
    """Common units back to `kind`'s, rounded up or down onto its grid."""
    if kind == "date" or _SCALE[kind] == 100:
        return values
    return -(-values // 100) if up else values // 100


def _hold_rules(decl: Declaration, source: SourceSchema, values: dict[str, np.ndarray],
                ranges: dict[str, tuple[int, int]]) -> None:
    """Make every not_greater_than pair of `source` hold in `values` (in place)."""
    kinds = {c.name: c.kind for c in source.columns}
    pairs = source.not_greater_than
    for _ in range(len(pairs) + 1):
        for left, right in pairs:
            lk, rk = kinds[left], kinds[right]
            # The right side's least value on its grid that the left's minimum does not exceed.
            least = int(_from_cents(np.array([_to_cents(ranges[left][0], lk)]), rk, True)[0])
            if least > ranges[right][1]:
                raise SettingsError(f"{decl.path}: sources.{source.name}.not_greater_than: "
                                    f"{left} <= {right} cannot hold: the least {left} is above the "
                                    f"largest {right}")
            values[right] = np.maximum(values[right], least)
            values[left] = np.minimum(values[left],
                                      _from_cents(_to_cents(values[right], rk), lk, False))
    for left, right in pairs:
        if np.any(_to_cents(values[left], kinds[left]) > _to_cents(values[right], kinds[right])):
            raise SettingsError(f"{decl.path}: sources.{source.name}.not_greater_than: the pairs "
                                "cannot all hold within the columns' ranges")


def _frame(decl: Declaration, source: SourceSchema, idx: np.ndarray, seed: int, start: int,
           s: int) -> pd.DataFrame:
    """One chunk of `source`'s rows as codes: idx, perm and c<i> (+ c<i>_empty) per column."""
    n = len(idx)
    data: dict[str, np.ndarray] = {"idx": idx}
    values: dict[str, np.ndarray] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for i, col in enumerate(source.columns):
        if col.kind == "id":
            continue
        rng = np.random.default_rng([seed, start, s, i])
        if col.kind == "category":
            values[col.name] = rng.integers(0, len(col.domain), n)
        elif col.kind == "text":
            values[col.name] = rng.integers(0, len(LISTS["words"]) * len(LISTS["suffix"]), n)
        else:
            ranges[col.name] = bounds(decl, source, col)
            values[col.name] = rng.integers(ranges[col.name][0], ranges[col.name][1] + 1, n,
                                            dtype=np.int64)
        data[f"c{i}_empty"] = (rng.random(n) < EMPTY) if not col.required \
            else np.zeros(n, dtype=bool)
    _hold_rules(decl, source, values, ranges)
    for i, col in enumerate(source.columns):
        if col.kind != "id":
            data[f"c{i}"] = values[col.name]
    data["perm"] = np.random.default_rng([seed, start, s, len(source.columns)]).permutation(n)
    return pd.DataFrame(data)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def file_sql(source: SourceSchema) -> str:
    """The SELECT that turns a chunk's codes (relation `chunk`) into the file's rows."""
    words, n_suffix = "$words", len(LISTS["suffix"])
    out = []
    for i, col in enumerate(source.columns):
        v = f"c{i}"
        if col.kind == "id":
            out.append(f"$prefix || printf('_%08d', idx) AS {_quote(col.name)}")
            continue
        if col.kind == "category":
            value = f"$domain{i}[{v} + 1]"
        elif col.kind == "text":
            value = f"{words}[{v} // {n_suffix} + 1] || $suffix[{v} % {n_suffix} + 1]"
        elif col.kind == "decimal":
            value = f"{v} / 100"
        elif col.kind == "money":
            value = f"CAST({_MONEY_TEXT.format(v=v)} AS DECIMAL(18,2))"
        elif col.kind == "date":
            value = f"DATE '{ANCHOR}' + CAST({v} AS INTEGER)"
        else:
            value = v
        out.append(f"CASE WHEN {v}_empty THEN NULL ELSE {value} END AS {_quote(col.name)}")
    return f"SELECT {', '.join(out)} FROM chunk ORDER BY perm"


def _params(decl: Declaration, source: SourceSchema) -> dict[str, object]:
    sql = file_sql(source)
    params: dict[str, object] = {"prefix": decl.key.removesuffix("_id") or decl.key}
    if "$words" in sql:
        params |= {"words": LISTS["words"], "suffix": LISTS["suffix"]}
    params |= {f"domain{i}": list(c.domain) for i, c in enumerate(source.columns)
               if c.kind == "category"}
    return params


def generate_declared(decl: Declaration, rows: int, seed: int = 42,
                      out_dir: str | Path = "data") -> dict[str, Path]:
    """Write each source's file of `decl` for `rows` keys into `out_dir`; their paths."""
    if rows < 1:
        raise ValueError("rows must be at least 1")
    for source in decl.sources:  # a range or rule that cannot hold: before anything is written
        ranges = {c.name: bounds(decl, source, c) for c in source.columns
                  if c.kind not in ("id", "category", "text")}
        _hold_rules(decl, source, {c: np.array(r) for c, r in ranges.items()}, ranges)
    finals = {s.name: Path(out_dir) / s.filename for s in decl.sources}
    con = duckdb.connect(":memory:")
    try:
        with chunked_files(finals) as chunk_of:
            for n, start in enumerate(range(0, rows, CHUNK_ROWS)):
                count = min(CHUNK_ROWS, rows - start)
                rng = np.random.default_rng([seed, start])
                idx = np.arange(start + 1, start + count + 1, dtype=np.int64)
                shared = (rng.random(count) < SHARED) | (idx == 1)
                only = rng.integers(0, len(decl.sources), count)
                for s, source in enumerate(decl.sources):
                    chunk = _frame(decl, source, idx[shared | (only == s)], seed, start, s)
                    con.register("chunk", chunk)
                    with chunk_of(source.name) as part:
                        con.execute(
                            f"COPY ({file_sql(source)}) TO $path (FORMAT csv, HEADER $header)",
                            {**_params(decl, source), "path": str(part), "header": n == 0})
                    con.unregister("chunk")
    finally:
        con.close()
    return finals
