"""Ctrl-C and SIGTERM for `etl-assets run`: which signal came, whatever handler caught it.

Dagster installs its own SIGINT/SIGTERM handler while it executes a run in this process (it
turns the signal into a failed step at its next checkpoint), so our handler does not always see
the signal. The interpreter's wakeup fd does: every signal that reaches a Python-level handler
writes its number there first, so `SignalWatch.received()` knows about it either way.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

WATCHED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal during `phase` (sources, shards or customer_profiles)."""

    def __init__(self, phase: str):
        super().__init__(phase)
        self.phase = phase


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


class SignalWatch:
    """Records SIGINT/SIGTERM (see the module docstring); `received()` is the first one."""

    def __init__(self, read_fd: int):
        self._read_fd = read_fd
        self._seen: list[int] = []

    def received(self) -> int | None:
        """The first watched signal received so far, or None."""
        try:
            while True:
                data = os.read(self._read_fd, 64)
                if not data:
                    break
                self._seen += [b for b in data if b in WATCHED]
        except BlockingIOError:
            pass
        return self._seen[0] if self._seen else None


def _note(signum: int, frame: FrameType | None) -> None:
    """Do nothing here: the wakeup fd has recorded the signal, and the runner checks it at safe
    points (between Dagster runs, while it waits for shard workers).

    Raising KeyboardInterrupt from a handler would land wherever the main thread happens to
    be, a garbage-collection callback included, where Python prints it and carries on. And
    SIGTERM's default would end the process at once, skipping the workers' shutdown.
    """


@contextmanager
def watching() -> Iterator[SignalWatch]:
    """Record SIGINT and SIGTERM instead of acting on them at once; restore on exit.

    Only the main thread can install handlers; elsewhere the watch never reports a signal.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    watch = SignalWatch(read_fd)
    if threading.current_thread() is not threading.main_thread():
        try:
            yield watch
        finally:
            os.close(read_fd)
            os.close(write_fd)
        return
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous = {sig: signal.getsignal(sig) for sig in WATCHED}
    for sig in WATCHED:
        signal.signal(sig, _note)
    try:
        yield watch
    finally:
        watch.received()  # drain, so late arrivals are still counted
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(read_fd)
        os.close(write_fd)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then deliver them.

    Between COMMIT and the export's rename the table and the export disagree; an interrupt
    there would leave them so until the next run. (Signals reach only the main thread's
    handlers; elsewhere this does nothing.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in received[:1]:
            signal.raise_signal(signum)
