"""Where a run writes, held against what it reads and keeps: no write may land on an input.

A run writes the export, the warehouse file (and its WAL), the snapshot, the staging folder,
the export's parts, DuckDB's spill folder, the run lock and, by default, the Dagster home. It
reads the four source files and keeps the warehouse, the snapshot and staging between runs.
Every one of these paths is resolved (symlinks, `..`, relative spellings) and compared before
anything runs: `--export data/crm.csv`, an export that is the warehouse, or a staging folder
that holds the sources would destroy what the next run reads, so they are refused.

A file written by rename (the export, the snapshot) may replace a hard link to an input: the
rename gives the path a new file and the input keeps its bytes. A file DuckDB writes in place
(the warehouse and its WAL) may not share its inode with an input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Place:
    """One path a run touches: its role (for the message), whether it is a folder the run
    writes anything into, and whether the run changes the file in place (not by rename)."""

    role: str
    path: Path
    folder: bool = False
    in_place: bool = False


def resolved(path: str | Path) -> Path:
    """`path` absolute, with `..` and every symlink that exists followed."""
    return Path(os.path.realpath(os.path.abspath(path)))


def _inside(child: Path, folder: Path) -> bool:
    return child == folder or folder in child.parents


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist yet: nothing can be shared
        return False


def collision(writes: list[Place], reads: list[Place]) -> str | None:
    """The first write that would land on something the run reads or keeps, as one line
    naming both, or None. Two writes to one path collide too (one would replace the other)."""
    places = [(w, resolved(w.path)) for w in writes]
    others = places + [(r, resolved(r.path)) for r in reads]
    for i, (write, wpath) in enumerate(places):
        for j, (other, opath) in enumerate(others):
            if j <= i:
                continue
            # A folder the run writes into holds whatever lies below it.
            hit = (wpath == opath or (write.folder and _inside(opath, wpath))
                   or (other.folder and _inside(wpath, opath)))
            if not hit and not write.folder and not other.folder \
                    and (write.in_place or other.in_place):
                hit = _same_file(wpath, opath)
            if hit:
                return (f"{write.role} {write.path} would overwrite {other.role} {other.path}: "
                        "give them different paths")
    return None
