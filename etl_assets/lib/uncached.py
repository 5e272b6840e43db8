"""Big files written and read around the page cache (O_DIRECT), where the filesystem allows it.

The export is 2.8 GB at 10M customers, written whole by every publish and read
only by the next one. Through the page cache, every page of it is memory the kernel must first
find and fill: measured on this 2-core VM, writing 2.85 GB cost 3-8.5 CPU-s buffered against
0.35 CPU-s direct, and reading it back uncached 6.3-6.9 CPU-s buffered against 0.2 direct
(docs/performance.md). Direct I/O moves whole aligned blocks between the disk and a buffer of
ours; the last, partial block of a file goes through the page cache as usual. On a filesystem
that refuses O_DIRECT (tmpfs on older kernels, some network filesystems) or a system without
it, the same calls do buffered I/O: the bytes are the same either way.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

# A multiple of any logical block size; mmap'd buffers are page-aligned, as O_DIRECT wants.
BLOCK = 1 << 22
_ALIGN = 4096
_DIRECT = getattr(os, "O_DIRECT", 0)


def _open(path: str | Path, flags: int) -> tuple[int, bool]:
    """(fd, whether it does direct I/O): O_DIRECT where the filesystem takes it. A new file
    gets the mode `open()` gives (0o666 less the umask)."""
    if _DIRECT:
        try:
            return os.open(path, flags | _DIRECT, 0o666), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o666), False


def _buffered(fd: int) -> None:
    """Turn O_DIRECT off on `fd` (for an unaligned tail, or where a direct call was refused)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_DIRECT)


class UncachedWriter:
    """A binary file written from its start through BLOCK-sized buffers of ours, each full
    block written direct by a thread while the caller fills the next (a direct write waits
    for the disk). `finish()` writes the tail and fsyncs; leaving the `with` block closes the
    file (without finishing it, on an error)."""

    def __init__(self, path: str | Path) -> None:
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[mmap.mmap | None] = queue.SimpleQueue()
        for _ in range(3):  # before the file is opened: nothing to close if this fails
            self._free.put(mmap.mmap(-1, BLOCK))
        self._fd, self.direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self.direct_bytes = 0  # written around the page cache (the rest went through it)
        self._buf = self._free.get()
        self._view = memoryview(self._buf)
        self._fill = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> UncachedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, data: bytes | memoryview) -> int:
        """Copy `data` into the buffer, handing each block to the writing thread as it fills."""
        view = memoryview(data).cast("B")
        done, n = 0, len(view)
        while done < n:
            take = min(BLOCK - self._fill, n - done)
            self._view[self._fill:self._fill + take] = view[done:done + take]
            self._fill += take
            done += take
            if self._fill == BLOCK:
                self._hand_off()
        return n

    def _hand_off(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_blocks, daemon=True,
                                             name="etl-write-behind")
            self._thread.start()
        self._view.release()
        self._full.put(self._buf)
        self._buf = self._free.get()  # waits while every other buffer is being written
        self._view = memoryview(self._buf)
        self._fill = 0
        self._raise_if_failed()

    def _write_blocks(self) -> None:
        while (buf := self._full.get()) is not None:
            if self._error is None:
                try:
                    with memoryview(buf) as view:
                        self._write_all(view)
                except BaseException as exc:  # raised in the caller's thread
                    self._error = exc
            self._free.put(buf)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        """Wait until every full block handed off is written."""
        if self._thread is not None:
            self._full.put(None)
            self._thread.join()
            self._thread = None

    def _write_all(self, view: memoryview) -> None:
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self._direct_off()  # refused direct (alignment): the rest buffered
                continue
            if written == 0:
                raise OSError(errno.EIO, "write returned 0 bytes")
            view = view[written:]
            if self.direct:
                self.direct_bytes += written
            if view and self.direct and written % _ALIGN:
                self._direct_off()  # a short write leaves the next offset unaligned

    def _direct_off(self) -> None:
        _buffered(self._fd)
        self.direct = False

    def finish(self) -> None:
        """Write the last, partial block (through the page cache unless it is aligned) and
        fsync: the file is whole on disk when this returns."""
        self._drain()
        self._raise_if_failed()
        if self._fill:
            if self.direct and self._fill % _ALIGN:
                self._direct_off()
            self._write_all(self._view[:self._fill])
            self._fill = 0
        os.fsync(self._fd)

    def close(self) -> None:
        self._drain()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def blocks(path: str | Path) -> Iterator[memoryview]:
    """The bytes of the file at `path`, in order, BLOCK at a time (the last one shorter), read
    direct while a thread reads the next block: the disk and the caller's work overlap. Each
    view is valid until the next one is asked for."""
    buffers = [mmap.mmap(-1, BLOCK) for _ in range(3)]
    fd, direct = _open(path, os.O_RDONLY)
    free: queue.SimpleQueue[mmap.mmap | None] = queue.SimpleQueue()
    full: queue.SimpleQueue[tuple[mmap.mmap, int] | BaseException] = queue.SimpleQueue()
    for buf in buffers:
        free.put(buf)

    def read_ahead() -> None:
        nonlocal direct
        try:
            while (buf := free.get()) is not None:
                filled = 0
                with memoryview(buf) as view:
                    while filled < BLOCK:
                        if direct and filled % _ALIGN:
                            _buffered(fd)  # a short read mid-file: read on unaligned
                            direct = False
                        try:
                            got = os.readv(fd, [view[filled:]])
                        except OSError as exc:
                            if exc.errno != errno.EINVAL or not direct:
                                raise
                            _buffered(fd)  # opened direct, but the read refused it
                            direct = False
                            continue
                        if not got:
                            break
                        filled += got
                full.put((buf, filled))
                if filled < BLOCK:
                    return
        except BaseException as exc:  # handed to the reader of the blocks
            full.put(exc)

    reader = threading.Thread(target=read_ahead, name="etl-read-ahead", daemon=True)
    try:
        reader.start()
    except BaseException:
        os.close(fd)
        raise
    try:
        while True:
            item = full.get()
            if isinstance(item, BaseException):
                raise item
            buf, filled = item
            if filled:
                yield memoryview(buf)[:filled]
            if filled < BLOCK:
                return
            free.put(buf)
    finally:
        free.put(None)
        reader.join()
        os.close(fd)


def sha256(path: str | Path) -> str:
    """sha256 of the file's bytes, read around the page cache (see `blocks`)."""
    digest = hashlib.sha256()
    for view in blocks(path):
        digest.update(view)
    return digest.hexdigest()
