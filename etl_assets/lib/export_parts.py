"""The export assembled from per-shard sorted parts: a one-row change rewrites one part.

Each shard's rows are written once, sorted by customer_id, as a header-less CSV part by
DuckDB's own CSV writer (the same writer, options and column order as a whole-table COPY, so
every row's bytes are the same). A part is named by the shard's version (its manifest entry),
so an unchanged shard's part is reused; the export is the header followed by a k-way merge of
the parts on customer_id. A part's name also records the sha256 of its bytes, taken when it was
written: a part is hashed as it is merged and refused if it is not
the file written. Shards route customers by hash, so every part spans the whole id
range and the merge interleaves them all; it is a streaming merge of sorted files, not a sort.

What it buys (1M customers, beside a whole-table export): a one-row change 6.6 -> 4.6 s;
docs/performance.md, "What each mechanism buys". Each part is proven by its sha256 as merged.

The order is DuckDB's `ORDER BY customer_id` (VARCHAR: byte order of the UTF-8 text). A part
is *plain* when no value holds a line break (one record per line) and no customer_id holds a
byte at or below the comma (so it is never quoted, and its line sorts as its id: the comma
that ends it is below every byte an id may continue with). Plain parts are merged as whole
lines, the fast path: in rounds of a chunk of lines per part, where every line up to the
smallest chunk's last line is sorted at once by `list.sort` (C, where `heapq.merge` is a Python
generator). Otherwise the merge reads records and
compares the decoded first field: DuckDB doubles quotes inside quoted values, so a record ends
at the first line break after an even number of quote characters.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import io
import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import duckdb

from etl_assets.lib.files import file_sha256

_BUFFER = 1 << 20


PLAIN, RECORDS = "plain", "records"  # the part file's last name component: how to merge it
# An id byte that could be quoted or sort below the comma ending it; a line break in a value.
_ID_NOT_PLAIN = r"[\x00-\x2c]"


def part_prefix(shard_count: int, shard_id: int, version: str) -> str:
    """The start of the part file's name for one shard version (`<count>-<shard>-<hash>.`);
    the name goes on with the sha256 of the part's bytes and ends in `plain.csv` or
    `records.csv` (`part_name`)."""
    digest = hashlib.sha256(version.encode("utf-8")).hexdigest()[:20]
    return f"{shard_count}-{shard_id}-{digest}."


def part_name(prefix: str, sha256: str, plain: bool) -> str:
    """The file name of a part: its prefix, the sha256 of its bytes and how it is merged."""
    return f"{prefix}{sha256}.{PLAIN if plain else RECORDS}.csv"


def recorded_sha256(part: Path) -> str | None:
    """The sha256 the part's name recorded when it was written (None: a name without one)."""
    fields = part.name.split(".")
    if len(fields) == 4 and len(fields[1]) == 64:
        return fields[1]
    return None


def is_plain(part: Path) -> bool:
    """Whether write_part found the part plain (its name says so)."""
    return part.name.endswith(f".{PLAIN}.csv")


def write_part(con: duckdb.DuckDBPyConnection, rows_sql: str, text_columns: list[str],
               folder: Path, prefix: str, params: list | None = None,
               key: str = "customer_id") -> Path:
    """Write `rows_sql` (sorted by `key`, its first column; bound `params`) as a header-less
    CSV part in
    `folder`, through a temp name, an fsync and a rename (a part on disk is always complete,
    also after a power cut: it is reused by later runs) to its name (`part_name`: the sha256
    of what was written, read back from the page cache); return it. `text_columns` are the
    VARCHAR columns, where a line break could be."""
    # contains() rather than a regex per value: a third of the cost. A repeated id (which the
    # audit rejects) would leave lines of one id in any order: such a part is merged by id.
    breaks = " OR ".join(f"contains({c}, chr(10)) OR contains({c}, chr(13))"
                         for c in text_columns)
    not_plain = con.execute(
        f"SELECT coalesce(bool_or(regexp_matches({key}, ?) OR {breaks}), false) "
        f"OR count(*) <> count(DISTINCT hash({key})) FROM ({rows_sql})",
        [_ID_NOT_PLAIN, *(params or [])],
    ).fetchone()[0]
    tmp = folder / f".{prefix}{os.getpid()}.tmp"
    try:
        # A relation's write_csv is DuckDB's COPY ... (FORMAT csv) and keeps the query's order;
        # unlike COPY's own statement it takes the query's bound parameters.
        con.sql(rows_sql, params=params or []).write_csv(str(tmp), sep=",", header=False)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        target = folder / part_name(prefix, file_sha256(tmp), plain=not not_plain)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def header(con: duckdb.DuckDBPyConnection, columns_sql: str, scratch: Path) -> bytes:
    """The header line DuckDB writes for `columns_sql` (a query returning no rows is enough)."""
    try:
        con.sql(columns_sql).write_csv(str(scratch), sep=",", header=True)
        return scratch.read_bytes()
    finally:
        scratch.unlink(missing_ok=True)


def _records(fh: BinaryIO) -> Iterator[bytes]:
    """The CSV records of a part, each with its line break(s)."""
    for line in fh:
        while line.count(b'"') % 2:  # a quoted value spans a line break: take the next line
            more = fh.readline()
            if not more:
                break
            line += more
        if not line.endswith(b"\n"):
            raise PartDamagedError([Path(fh.name)], "its last record has no line break")
        yield line


def _key(record: bytes) -> bytes:
    """The record's first field (customer_id) as the text DuckDB sorted (quotes removed)."""
    if not record.startswith(b'"'):
        end = record.find(b",")
        return record if end < 0 else record[:end]
    i = 1
    while True:
        j = record.index(b'"', i)
        if record[j + 1:j + 2] == b'"':  # a doubled quote inside the value
            i = j + 2
            continue
        return record[1:j].replace(b'""', b'"')


class MergeStopped(RuntimeError):
    """The merge was asked to stop (its caller failed or was interrupted meanwhile)."""


class PartDamagedError(RuntimeError):
    """Parts that are not what write_part wrote (cut short, lines out of order, or bytes that
    are not the sha256 its name records). The merge removes them; `paths` names them, the
    first one in the message."""

    def __init__(self, paths: list[Path], problem: str) -> None:
        self.paths = paths
        more = f" (and {len(paths) - 1} other part(s))" if len(paths) > 1 else ""
        super().__init__(f"{paths[0]}: damaged export part{more} ({problem})")


class _HashedFile(io.FileIO):
    """A part opened for reading that hashes each byte as it is read (its buffered reader
    fills itself through `readinto`), so proving it costs no second read."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "rb")
        self.path, self.digest = path, hashlib.sha256()

    def readinto(self, buffer: bytearray | memoryview) -> int | None:
        n = super().readinto(buffer)
        if n:
            with memoryview(buffer) as view:
                self.digest.update(view[:n])
        return n

    def readall(self) -> bytes:
        data = super().readall()
        self.digest.update(data)
        return data

    def proven(self) -> bool:
        """Whether every byte of the part was read and they are the ones its name records."""
        return self.tell() == os.fstat(self.fileno()).st_size \
            and self.digest.hexdigest() == recorded_sha256(self.path)


def _open_part(part: Path, buffering: int) -> tuple[BinaryIO, _HashedFile]:
    """The part as a buffered file to read, and its raw file (which hashes what is read)."""
    raw = _HashedFile(part)
    return io.BufferedReader(raw, buffering), raw  # type: ignore[return-value]


_BATCH = 1 << 16  # records written between two looks at `stop`
# Bytes of lines read from each plain part per round: 64-256 KiB measured alike, 1 MiB and up
# slower (the sort's working set leaves the CPU cache).
_CHUNK = 1 << 17


def _plain_batches(files: list[BinaryIO], chunk_bytes: int) -> Iterator[list[bytes]]:
    """The lines of sorted `files`, merged, in sorted batches: each round takes every line up
    to the smallest of the parts' last lines read. No line yet unread can sort before it (each
    part is sorted), so the batch is the next stretch of the merge, in the order
    `heapq.merge` gives (equal lines are the same bytes)."""
    def read(i: int) -> list[bytes]:
        chunk = files[i].readlines(chunk_bytes)
        if chunk and not chunk[-1].endswith(b"\n"):
            # A part cut short would glue its last line to the next one written.
            raise PartDamagedError([Path(files[i].name)], "its last line has no line break")
        return chunk

    chunks = [read(i) for i in range(len(files))]
    live = [i for i, chunk in enumerate(chunks) if chunk]
    while live:
        owner = min(live, key=lambda i: chunks[i][-1])
        cutoff = chunks[owner][-1]
        batch: list[bytes] = []
        for i in live:
            chunk = chunks[i]
            taken = bisect.bisect_right(chunk, cutoff)
            if i == owner and taken < len(chunk):
                # Only a part whose lines are out of order stops short of its own last line.
                raise PartDamagedError([Path(files[i].name)], "lines out of order")
            batch += chunk[:taken]
            chunks[i] = chunk[taken:] or read(i)
        batch.sort()
        yield batch
        live = [i for i in live if chunks[i]]


def merge(head: bytes, parts: list[Path], out: BinaryIO,
          stop: threading.Event | None = None, chunk_bytes: int = _CHUNK) -> int:
    """Write `head`, then the records of the sorted `parts` merged on customer_id: as whole
    lines when every part is plain (`chunk_bytes` of each per round), else record by record on
    the decoded id; return how many records were written. MergeStopped as soon as `stop` is
    set (looked at between batches). Each part is hashed as it is read: PartDamagedError
    (once all is written) for those whose bytes are not the sha256 their name records, as
    for a part cut short or out of order (at once); what was written is then not an export."""
    opened = [_open_part(p, _BUFFER) for p in parts]
    files = [fh for fh, _ in opened]
    try:
        out.write(head)
        if all(map(is_plain, parts)):
            batches = _plain_batches(files, chunk_bytes)
        else:
            merged = heapq.merge(*map(_records, files), key=_key)
            batches = iter(lambda: list(itertools.islice(merged, _BATCH)), [])
        records = 0
        for batch in batches:
            if stop is not None and stop.is_set():
                raise MergeStopped("export merge stopped")
            out.writelines(batch)
            records += len(batch)
        damaged = [raw.path for _, raw in opened if not raw.proven()]
        if damaged:
            raise PartDamagedError(damaged, "not the bytes whose sha256 its name records")
        return records
    except PartDamagedError as exc:
        for path in exc.paths:
            path.unlink(missing_ok=True)
        raise
    finally:
        for fh in files:
            fh.close()
