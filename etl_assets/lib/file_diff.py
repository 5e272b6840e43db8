"""Where two versions of a CSV file differ: the one stretch of whole records between their
common start and their common end.

A source edited in place (a row changed, added or removed) differs from its previous version
in one stretch; everything before it and after it is the same bytes. Finding that stretch costs
one read of each file, far less than reading, validating and routing every row again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from etl_assets.lib import uncached

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Region:
    """The differing records: bytes [start, old_end) of the old file, [start, new_end) of the
    new one; both begin and end at a record boundary (after a line break outside quotes)."""

    start: int
    old_end: int
    new_end: int


def _common_prefix(a: bytes, b: bytes) -> int:
    """How many leading bytes `a` and `b` share."""
    if a == b:  # the usual chunk: one comparison
        return len(a)
    n = min(len(a), len(b))
    lo, hi = 0, n
    while lo < hi:  # binary search on slices: memcmp speed, no per-byte Python loop
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: bytes, b: bytes) -> int:
    """How many trailing bytes `a` and `b` share."""
    if a == b:
        return len(a)
    n = min(len(a), len(b))
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def changed_region(old: Path, old_sha256: str, new: Path, header_end: int,
                   max_fraction: float) -> Region | None:
    """The stretch of records in which `new` differs from `old`, or None when there is no
    such single stretch worth using: `old` is not the file whose sha256 is `old_sha256` (it
    is hashed as it is read), the files are equal, the stretch touches the header (the first
    `header_end` bytes) or holds more than `max_fraction` of either file, or its ends are not
    record boundaries in both files.

    Record boundaries are line breaks outside quotes: the count of quote characters before
    one is even (a quote inside a quoted value is written doubled, so it keeps the parity).
    """
    old_size, new_size = old.stat().st_size, new.stat().st_size
    digest = hashlib.sha256()
    with open(old, "rb") as fo, open(new, "rb") as fn:
        # Forward: the common prefix, its last record boundary and the quotes before that;
        # the rest of `old` is read on for its hash. `old` is the copy kept at staging,
        # written and so read around the page cache (uncached).
        prefix = quotes = boundary = quotes_at_boundary = 0
        differs = False
        for view in uncached.blocks(old):
            digest.update(view)
            if not differs:
                a = bytes(view)
                b = fn.read(len(a))
                same = _common_prefix(a, b)
                line_end = a.rfind(b"\n", 0, same)
                if line_end >= 0:
                    boundary = prefix + line_end + 1
                    quotes_at_boundary = quotes + a.count(b'"', 0, line_end + 1)
                quotes += a.count(b'"', 0, same)
                prefix += same
                differs = same < max(len(a), len(b))
        if not differs:  # `old` is a prefix of `new` (records appended) or the same file
            differs = prefix < new_size
        if digest.hexdigest() != old_sha256 or not differs or boundary < header_end:
            return None
        # Backward: the common suffix, at most what the prefix left of the smaller file.
        limit = min(old_size, new_size) - prefix
        suffix = 0
        while suffix < limit:
            size = min(_CHUNK, limit - suffix)
            fo.seek(old_size - suffix - size)
            fn.seek(new_size - suffix - size)
            same = _common_suffix(fo.read(size), fn.read(size))
            suffix += same
            if same < size:
                break
        # The region ends after the first line break inside the common suffix (the same
        # bytes in both files), or at the end of both files.
        old_end = old_size
        if suffix:
            fo.seek(old_size - suffix)
            cut = fo.read(min(suffix, _CHUNK)).find(b"\n")
            if cut < 0:
                return None
            old_end = old_size - suffix + cut + 1
        new_end = old_end + (new_size - old_size)
        # Both stretches are bounded: a file cut to a few records has a short new stretch
        # and an old one that is most of the old file (read into memory by the caller).
        if new_end - boundary > max_fraction * new_size \
                or old_end - boundary > max_fraction * old_size:
            return None
        fo.seek(boundary)
        fn.seek(boundary)
        old_quotes = fo.read(old_end - boundary).count(b'"')
        new_quotes = fn.read(new_end - boundary).count(b'"')
    if quotes_at_boundary % 2 or old_quotes % 2 or new_quotes % 2:
        return None
    return Region(boundary, old_end, new_end)


def read_region(path: Path, start: int, end: int) -> bytes:
    """Bytes [start, end) of `path`."""
    with open(path, "rb") as fh:
        fh.seek(start)
        return fh.read(end - start)


def link_or_copy(source: Path, target: Path) -> None:
    """`target` as a hard link of `source` (staged files are never changed in place once
    written), or a copy where the filesystem has no hard links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
