"""The bench's edits of a declaration's source files: one row, 1% scattered, new keys appended."""

# Byte-level, line by line, so they stay fast at 10M rows: a record is one line (neither
# generator quotes a line break; a line with an open quote is refused), a field is found by the
# file's header and may be quoted (RFC 4180, `""` inside). The changed column is one numeric
# column of one source (`edit_target`); a changed value stays within its kind and range.

from __future__ import annotations

import codecs
import csv
import itertools
import math
import os
import random
import re
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path

from etl_assets.lib.declaration import NUMERIC_KINDS, Column, Declaration, SourceSchema
from etl_assets.lib.rules import DECLARATION
from etl_assets.lib.settings import SettingsError

# The realistic refreshes: the share of one source's records changed at scattered positions
# (drawn with the seed), and the share of new keys appended to every source.
SCATTER_FRACTION = 0.01
APPEND_FRACTION = 0.005
REFRESH_SEED = 7

# One CSV field at a position: quoted (with "" inside) or plain up to the next comma.
_FIELD = re.compile(rb'"(?:[^"]|"")*"|[^,"\r\n]*')
# A key ending in its number: the generators' `cust_00000001`, `vehicle_00000001`.
_NUMBERED = re.compile(rb"(.*?)(\d+)\Z", re.DOTALL)


class EditError(SettingsError):
    """A declaration or file the bench cannot edit: one line naming it (the CLI's exit 2)."""


def _in_pairs(source: SourceSchema) -> set[str]:
    return {c for pair in source.not_greater_than for c in pair}


def _step(col: Column) -> Decimal | None:
    """How far a value moves, up or down, so that one of the two stays in range whatever the
    value: 1 where the range allows it, else a cent (not for an int); None where neither does."""
    if col.min is None or col.max is None:
        return Decimal(1)
    low, high = Decimal(str(col.min)), Decimal(str(col.max))
    if col.kind == "int":
        return Decimal(1) if math.floor(high) - math.ceil(low) >= 1 else None
    if high - low >= 2:
        return Decimal(1)
    return Decimal("0.01") if high - low >= Decimal("0.02") else None


def edit_target(decl: Declaration) -> tuple[SourceSchema, Column]:
    """The one column the bench changes: in the narrowest source (fewest columns; ties in
    declaration order), its first numeric (int, decimal, money) column outside the key and any
    not_greater_than pair, whose range leaves room to move. For the shipped declaration that is
    billing's `mrr`, the column every earlier bench changed, so their figures stay comparable."""
    for source in sorted(decl.sources, key=lambda s: len(s.columns)):
        for col in source.data_columns:
            if col.kind in NUMERIC_KINDS and col.name not in _in_pairs(source) and _step(col):
                return source, col
    raise EditError(f"{decl.path}: the bench changes one numeric (int, decimal, money) column "
                    "outside any not_greater_than pair whose range leaves room to change a "
                    "value, and no source has one")


def _column_index(path: Path, column: str) -> int:
    """Where `column` is in the records of `path`, by its header."""
    with open(path, "rb") as fh:
        names = next(csv.reader([codecs.decode(fh.readline(), "utf-8-sig")]))
    if column not in names:
        raise EditError(f"{path}: no column {column} in its header")
    return names.index(column)


def _check_line(path: Path, line: bytes) -> None:
    # An odd number of quotes: a quoted field goes on past the line's end.
    if line.count(b'"') % 2:
        raise EditError(f"{path}: a quoted field holds a line break; the bench edits records "
                        "line by line and cannot edit this file")


def _span(line: bytes, index: int, path: Path) -> tuple[int, int]:
    """Start and end of field `index` of one record."""
    pos = 0
    for _ in range(index):
        pos = _FIELD.match(line, pos).end()
        if line[pos:pos + 1] != b",":
            raise EditError(f"{path}: a record with fewer fields than its header: {line[:200]!r}")
        pos += 1
    return pos, _FIELD.match(line, pos).end()


def bump(text: bytes, col: Column) -> bytes:
    """`text` moved by one step (up, or down where up leaves the range), written as its kind
    is; an empty value becomes the range's low end (0 where none is declared)."""
    raw = text.strip().strip(b'"').decode()
    step = _step(col)
    if step is None:
        raise EditError(f"{col.name}: its range leaves no room to change a value")
    try:
        old = Decimal(raw) if raw else None
    except InvalidOperation:
        raise EditError(f"{col.name}: {raw!r} is not a number") from None
    if old is not None:
        candidates = [old + step, old - step]
    elif col.min is not None:
        candidates = [Decimal(str(col.min)).quantize(step, rounding=ROUND_CEILING)]
    elif col.max is not None and col.max < 0:
        candidates = [Decimal(str(col.max)).quantize(step, rounding=ROUND_FLOOR)]
    else:
        candidates = [Decimal(0)]
    low = None if col.min is None else Decimal(str(col.min))
    high = None if col.max is None else Decimal(str(col.max))
    for value in candidates:
        if (low is None or value >= low) and (high is None or value <= high):
            if col.kind == "money":
                return str(value.quantize(Decimal("0.01"))).encode()
            if col.kind == "int":
                return str(int(value)).encode()
            # A decimal keeps at most 15 significant digits (validation rejects more).
            if len(value.normalize().as_tuple().digits) > 15:
                raise EditError(f"{col.name}: {raw} moved by {step} needs over 15 digits")
            return format(value, "f").encode()
    raise EditError(f"{col.name}: {raw!r} moved by {step} leaves its range")


def _replace(line: bytes, index: int, col: Column, path: Path) -> bytes:
    _check_line(path, line)
    start, end = _span(line, index, path)
    return line[:start] + bump(line[start:end], col) + line[end:]


def change_one_row(data: Path, decl: Declaration = DECLARATION) -> None:
    """Move the target column's value of the first record of its source (`edit_target`)."""
    source, col = edit_target(decl)
    path = data / source.filename
    index = _column_index(path, col.name)
    with open(path, "r+b") as fh:
        header = fh.readline()
        first = fh.readline()
        rest = fh.read()
        fh.seek(len(header))
        fh.write(_replace(first, index, col, path) + rest)
        fh.truncate()


def _records(path: Path) -> int:
    """Lines after the header (a record is one line: see the module docstring)."""
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 22), b"")) - 1


def change_scattered(data: Path, rows: int, fraction: float = SCATTER_FRACTION,
                     seed: int = REFRESH_SEED, decl: Declaration = DECLARATION) -> int:
    """Move the target column's value in `fraction` of its source's records, at positions drawn
    with `seed` across the whole file (a source refreshed here and there, not in one stretch).
    Returns 0: no key is added."""
    source, col = edit_target(decl)
    path = data / source.filename
    index = _column_index(path, col.name)
    total = _records(path)
    chosen = set(random.Random(seed).sample(range(total), max(1, round(total * fraction))))
    tmp = path.with_name(path.name + ".edit")
    with open(path, "rb") as src, open(tmp, "wb") as out:
        out.write(src.readline())
        for i, line in enumerate(src):
            if i in chosen:
                line = _replace(line, index, col, path)
            elif b'"' in line:
                _check_line(path, line)
            out.write(line)
    os.replace(tmp, path)
    return 0


def append_keys(data: Path, rows: int, fraction: float = APPEND_FRACTION,
                decl: Declaration = DECLARATION) -> int:
    """Append `fraction` x `rows` new keys to every source, the same new keys in each: numbered
    after the last generated one, spelled like the first record's key (`cust_00002001`); each
    new record is a copy of one of the file's first records under the new key. Returns how many
    keys were added."""
    added = max(1, round(rows * fraction))
    for source in decl.sources:
        path = data / source.filename
        index = _column_index(path, decl.key)
        with open(path, "rb") as fh:
            fh.readline()
            templates = [line for line in (fh.readline() for _ in range(min(added, 1000))) if line]
        if not templates:
            raise EditError(f"{path}: no record to copy")
        spans = []
        for line in templates:
            _check_line(path, line)
            spans.append(_span(line, index, path))
        start, end = spans[0]
        numbered = _NUMBERED.match(templates[0][start:end].strip(b'"'))
        if numbered is None:
            raise EditError(f"{path}: the key {templates[0][start:end]!r} does not end in a number")
        prefix, width = numbered.group(1), len(numbered.group(2))
        keys = [prefix + b"%0*d" % (width, rows + 1 + i) for i in range(added)]
        # A file without a final line break: the first new record goes on a line of its own.
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            ends_a_line = fh.read(1) == b"\n"
        if not templates[-1].endswith(b"\n"):
            templates[-1] += b"\n"
        with open(path, "ab") as out:
            out.write(b"" if ends_a_line else b"\n")
            out.writelines(t[:s] + key + t[e:] for key, t, (s, e)
                           in zip(keys, itertools.cycle(templates), itertools.cycle(spans)))
    return added
