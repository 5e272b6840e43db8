"""Resource limits for DuckDB connections (a leaf module: settings and warehouse both use it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DuckDBLimits:
    """How much memory and how many threads one DuckDB connection may use, and where it spills."""

    memory_limit: str = ""
    threads: int = 0  # 0: DuckDB's default, one per core
    temp_directory: str = ""
