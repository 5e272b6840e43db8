"""Paths handed to DuckDB are literal: a user's folder name is never read as a pattern.

DuckDB's readers expand `*`, `?` and `[...]` in every path they are given, also inside a list,
so `--data-dir "run*"` would read every sibling folder that matches and `var[x]` would match
`varx`. Each metacharacter is escaped as a one-character class (`[*]`, `[?]`, `[[]`), which
DuckDB's glob matches only against that same character.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

GLOB_CHARS = frozenset("*?[")


def duckdb_literal(path: str | Path) -> str:
    """`path` as a DuckDB reader argument that names exactly this one file."""
    return "".join(f"[{c}]" if c in GLOB_CHARS else c for c in str(path))


def duckdb_literals(paths: Iterable[str | Path]) -> list[str]:
    """`duckdb_literal` of each path, in order."""
    return [duckdb_literal(p) for p in paths]
