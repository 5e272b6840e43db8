"""Resource limits: for DuckDB connections, and how many runs one machine takes at once (a leaf
module: settings, warehouse and the instance config use it)."""

from __future__ import annotations

import os
from dataclasses import dataclass


def cores() -> int:
    """The cores runs share (what `--workers` defaults to)."""
    return os.cpu_count() or 1


def ram_bytes() -> int:
    """The machine's physical memory (0 if unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


# Per heavy DuckDB connection, then it spills. A process peaks above this by Python, Dagster
# and what DuckDB allocates outside its buffer pool; 1.5GB keeps a 10M run within issue 15's
# 2.5 GB, and 2GB did not (docs/performance.md#memory-and-threads).
DEFAULT_MEMORY_LIMIT = "1.5GB"


@dataclass(frozen=True)
class DuckDBLimits:
    """How much memory and how many threads one DuckDB connection may use, and where it spills."""

    memory_limit: str = ""
    threads: int = 0  # 0: DuckDB's default, one per core
    temp_directory: str = ""


# DuckDB reads "KB/MB/GB/TB" as powers of 1000 and "KiB/MiB/GiB/TiB" as powers of 1024.
_UNITS = {"K": 1, "M": 2, "G": 3, "T": 4}


def memory_bytes(limit: str) -> int:
    """A DuckDB memory limit such as `2GB` or `512MiB`, in bytes, read as DuckDB reads it."""
    text = limit.strip().upper().replace(" ", "")
    binary = text.endswith("IB")
    number, unit = text[:-3 if binary else -2], text[-3 if binary else -2]
    return int(float(number) * (1024 if binary else 1000) ** _UNITS[unit])


def run_slots(cores: int, ram_bytes: int, memory_limit: str) -> int:
    """How many Dagster runs may be in progress at once on this machine (at least 1).

    One per core, so that runs launched together (a UI "Materialize all", a backfill, sensors)
    never ask for more CPU than there is; and no more than leave half the memory to everything
    but DuckDB when each run's connection fills its `memory_limit`.
    """
    by_memory = ram_bytes // (2 * memory_bytes(memory_limit)) if ram_bytes > 0 else cores
    return max(1, min(cores, by_memory))


# What a run costs the machine that launches it when Celery workers run its steps: its process
# only orchestrates (it waits on its steps, polling once a second), but starting it imports
# Dagster and the code location (a few CPU-seconds) and it holds a few hundred MB.
ORCHESTRATOR_BYTES = 1_000_000_000
ORCHESTRATORS_PER_CORE = 4


def orchestrator_slots(cores: int, ram_bytes: int) -> int:
    """How many runs may be in progress at once on a machine whose runs only orchestrate (their
    steps queue at the broker; the workers' own concurrency bounds the work): four per core,
    so that launches overlap the waits, and no more than one per GB."""
    by_memory = ram_bytes // ORCHESTRATOR_BYTES if ram_bytes > 0 else cores
    return max(1, min(ORCHESTRATORS_PER_CORE * cores, by_memory))


def threads_per_run(cores: int, slots: int) -> int:
    """DuckDB threads for one run's connections when up to `slots` runs share `cores` cores.

    `slots` below 1 (a queue without a limit) counts as one run per core.
    """
    if slots < 1:
        slots = cores
    return max(1, cores // max(1, slots))
