"""Where two versions of a CSV file differ: the one stretch of whole records between their
common start and their common end.

A source edited in place (a row changed, added or removed) differs from its previous version
in one stretch; everything before it and after it is the same bytes. Finding that stretch costs
one read of each file, far less than reading, validating and routing every row again.

Where a record ends is decided as the CSV reader (validation.READ_CSV: quote and escape `"`)
decides it, or not at all. The reader keeps a quote inside an unquoted value as text
(`o"neil@x`), so counting quotes alone would misplace record boundaries after one; the bytes
the stretch is placed by are first proven to hold quotes only in well-formed quoted fields
(`_well_quoted`), where counting is exact.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from etl_assets.lib.schema import MAX_LINE_BYTES

_CHUNK = 1 << 20

# A quoted field as the reader parses it: it opens at a field's start (the start of the bytes,
# or after a comma or a line break), holds doubled quotes only and closes before a comma, a
# line break or the end. The pattern starts with the quote itself (the lookbehind after it):
# a search then skips to the next quote at C speed, where a leading lookbehind would be tried at
# every byte (docs/performance.md#sources).
_QUOTED_FIELD = re.compile(rb'"(?<![^,\n]")[^"]*(?:""[^"]*)*"(?![^,\r\n])')


@dataclass(frozen=True)
class Region:
    """The differing records: bytes [start, old_end) of the old file, [start, new_end) of the
    new one; both begin and end at a record boundary (after a line break outside quotes)."""

    start: int
    old_end: int
    new_end: int


def _well_quoted(data: bytes, end: int | None = None, quotes: int | None = None) -> bool:
    """Whether every quote in `data[:end]` (`quotes` of them, if counted already) belongs to
    a well-formed quoted field, the bytes starting at a record's start and ending after a line
    break or at the end of the file.

    Then the reader sees exactly these quoted fields (a quote that opens a field can only be
    closed where the pattern closes it: a doubled quote is a quote, a closing one is followed
    by a delimiter), so a line break after an even count of quotes is outside them: a record
    boundary. A quote anywhere else (inside an unquoted value, after a space, or a quoted value
    followed by text) makes it False.
    """
    end = len(data) if end is None else end
    quotes = data.count(b'"', 0, end) if quotes is None else quotes
    return b"".join(_QUOTED_FIELD.findall(data, 0, end)).count(b'"') == quotes


class _QuotedStream:
    """Bytes fed in pieces from a record's start: whether all of them up to the last record
    boundary seen are `_well_quoted`, and where that boundary is. What follows it waits for
    the next piece; past MAX_LINE_BYTES (the reader's limit on a line) without a boundary,
    the stream gives up (`ok` False)."""

    def __init__(self) -> None:
        self.ok = True
        self.boundary = 0  # offset just after the last record boundary, from the first byte
        self._rest = b""

    def feed(self, data: bytes) -> None:
        if not self.ok:
            return
        buf = self._rest + data
        cut, quotes = _last_even_line_end(buf)
        if cut and not _well_quoted(buf, cut, quotes):
            self.ok = False
            return
        self.boundary += cut
        self._rest = buf[cut:]
        if len(self._rest) > MAX_LINE_BYTES:
            self.ok = False


def _last_even_line_end(buf: bytes) -> tuple[int, int]:
    """(offset just after the last line break in `buf` with an even count of quotes before
    it, that count), looking back at most MAX_LINE_BYTES from the end; (0, 0) if none."""
    line_end = buf.rfind(b"\n")
    if line_end < 0:
        return 0, 0
    quotes = buf.count(b'"', 0, line_end)
    floor = max(0, len(buf) - MAX_LINE_BYTES)
    while quotes % 2:  # inside a multi-line quoted value (or after a stray quote)
        previous = buf.rfind(b"\n", floor, line_end)
        if previous < 0:
            return 0, 0
        quotes -= buf.count(b'"', previous, line_end)
        line_end = previous
    return line_end + 1, quotes


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
    surely record boundaries in both files.

    The rule for a record boundary, exact for the reader: a line break with an even count of
    quotes before it, in bytes whose every quote belongs to a well-formed quoted field
    (`_well_quoted`: opened at a field's start, doubled quotes inside, closed before a comma,
    a line break or the end). The stretch starts at the last such line break in the common
    start, whose bytes up to it are checked as they are read; it ends after the first line
    break in the common end with an even count of quotes in the old stretch before it; each
    stretch (from a record's start) is checked on its own. Where any quote stands elsewhere
    the parity proves nothing, and the answer is None. The rest of the common end needs no
    check: the same bytes in both files, read from a record's start in both. A line end other
    than the header's (a bare CR; CRLF in a LF file, or the reverse) is the reader's to
    refuse: it refuses the whole file, and so each stretch read on its own with the header.
    """
    old_size, new_size = old.stat().st_size, new.stat().st_size

    def bounded(old_length: int, new_length: int) -> bool:
        # A file cut to a few records has a short new stretch and an old one that is most of
        # the old file (read into memory here and by the caller): both are bounded.
        return old_length <= max_fraction * old_size and new_length <= max_fraction * new_size

    digest = hashlib.sha256()
    with open(old, "rb") as fo, open(new, "rb") as fn:
        # Forward: the common prefix, its quotes checked on the way up to its last record
        # boundary (the stretch starts there); the rest of `old` is read on for its hash.
        prefix = 0
        quoted = _QuotedStream()
        differs = False
        for a in iter(lambda: fo.read(_CHUNK), b""):
            digest.update(a)
            if not differs:
                b = fn.read(len(a))
                same = _common_prefix(a, b)
                quoted.feed(a[:same])
                prefix += same
                differs = same < max(len(a), len(b))
        if not differs:  # `old` is a prefix of `new` (records appended) or the same file
            differs = prefix < new_size
        start = quoted.boundary
        if digest.hexdigest() != old_sha256 or not differs or not quoted.ok \
                or start < header_end:
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
        if not bounded(old_size - suffix - start, new_size - suffix - start):
            return None
        fo.seek(start)
        old_stretch = fo.read(old_size - suffix - start)
        if suffix:
            # The stretch ends after a line break in the common suffix (the same bytes in
            # both files): the first one with an even count of quotes in the old stretch
            # before it (a line break inside a quoted value is not the end of a record).
            tail = fo.read(min(suffix, _CHUNK))
            quotes, counted = old_stretch.count(b'"'), 0
            cut = tail.find(b"\n")
            while cut >= 0:
                quotes += tail.count(b'"', counted, cut)
                if quotes % 2 == 0:
                    break
                counted = cut
                cut = tail.find(b"\n", cut + 1)
            if cut < 0:
                return None
            old_stretch += tail[:cut + 1]
        old_end = start + len(old_stretch)
        new_end = old_end + (new_size - old_size)
        if not bounded(old_end - start, new_end - start):
            return None
        # Each stretch starts at a record's start and ends after a line break or at the end of
        # the file: well quoted, it is whole records in both files.
        fn.seek(start)
        if not _well_quoted(old_stretch) or not _well_quoted(fn.read(new_end - start)):
            return None
    return Region(start, old_end, new_end)


def read_region(path: Path, start: int, end: int) -> bytes:
    """Bytes [start, end) of `path`."""
    with open(path, "rb") as fh:
        fh.seek(start)
        return fh.read(end - start)


#END
