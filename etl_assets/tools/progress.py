"""Live progress of `etl-assets run`: what it is doing while it does it.

On a terminal, a rich progress display on stderr (one line per phase, a bar for the sources and
the shards, the current activity beside it). Otherwise (a pipe, a log file, a test) plain
timestamped lines on stderr, one per event, and a "still" line whenever nothing was said for
`HEARTBEAT_S`, so a long stretch of work is never silent. stdout keeps the event lines and the
summary it always had.

Figures come from two places: the runner says which phase starts and which shard finished; the
steps that run in this process (the sources, customer_profiles and its checks) report their
stages through `lib.events.report_progress`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

from etl_assets.lib.events import progress_listener

# The phases, in the order a run goes through them (a phase with nothing to do is still named).
PHASES = ("startup", "sources", "shards", "customer_profiles", "checks", "done")
# A plain-line run says something at least this often (issue 15: no silent stretch over 5 s).
HEARTBEAT_S = 4.0

# One lock for every Progress: what it guards is the output. The runner forks its shard workers
# while the heartbeat thread may run; holding the lock around the fork means no write is half
# done in the parent (a child would inherit stderr's buffer lock held, and hang on its first
# write).
_LOCK = threading.RLock()
os.register_at_fork(before=_LOCK.acquire, after_in_parent=_LOCK.release,
                    after_in_child=_LOCK.release)

_SOURCE_STAGES = {
    "source_copy": "{source}: copying and hashing the file",
    "source_validate": "{source}: reading and validating",
    "source_changed": "{source}: staging the changed records ({size:,} bytes) onto the previous version",
    "source_stage": "{source}: routing {rows:,} accepted rows into {shards} slices",
    "source_rejected": "{source}: recording {rows:,} rejected rows",
}


def timestamp() -> str:
    """UTC, to the millisecond, as the plain lines start."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Progress:
    """Receives the run's progress and shows it (plain lines or a live display)."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None,
                 heartbeat_s: float = HEARTBEAT_S, silent: bool = False):
        # silent: nothing is shown (a caller that wants no progress, e.g. the drill or a test).
        self.stream: TextIO | None = None if silent else (stream or sys.stderr)
        self.live = (not silent) and (_is_terminal(self.stream) if live is None else live)
        self.heartbeat_s = heartbeat_s
        self.phase = "startup"
        self.activity = "starting"
        self.total = 0
        self.completed = 0
        self._lock = _LOCK
        self._last_said = time.monotonic()
        self._phase_started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rich: Any = None
        self._task: Any = None

    # -- what the runner and the steps say -------------------------------------------------
    def start_phase(self, phase: str, activity: str, total: int = 0) -> None:
        """A new phase begins; `total` > 0 gives it a bar (sources to stage, shards to build)."""
        with self._lock:
            if self._rich is not None and self._task is not None:
                self._rich.update(self._task, completed=self.total or 1, total=self.total or 1)
            self.phase, self.activity = phase, activity
            self.total, self.completed = total, 0
            self._phase_started = time.monotonic()
            if self._rich is not None:
                self._task = self._rich.add_task(self._description(), total=total or None)
            self._say(activity)

    def expect(self, total: int, activity: str) -> None:
        """The phase now knows how many things it will do (its bar's length)."""
        with self._lock:
            self.total = total
            if self._rich is not None and self._task is not None:
                self._rich.update(self._task, total=total or None)
        self.step(activity)

    def step(self, activity: str, advance: int = 0) -> None:
        """Something happened inside the phase (`advance`: one more of its `total` done)."""
        with self._lock:
            self.activity = activity
            self.completed += advance
            if self._rich is not None and self._task is not None:
                self._rich.update(self._task, description=self._description(),
                                  completed=self.completed)
            progress = f" [{self.completed} of {self.total}]" if advance and self.total else ""
            self._say(activity + progress)

    def on_event(self, stage: str, fields: dict[str, Any]) -> None:
        """A `report_progress` from a step running in this process."""
        if stage in _SOURCE_STAGES:
            self.step(_SOURCE_STAGES[stage].format(**fields))
        elif stage == "source_staged":
            self.step(f"{fields['source']}: {fields['rows']:,} rows staged, "
                      f"{fields['rejected']:,} rejected ({fields['elapsed_ms'] / 1000:.1f} s)",
                      advance=1)
        elif stage == "publish":
            self.step(fields["step"])
        elif stage == "checks":
            self.start_phase("checks", "checking the table and the export (row counts, "
                             "duplicates, keys, shards current)")

    # -- showing it ------------------------------------------------------------------------
    def _description(self) -> str:
        return f"{self.phase}: {self.activity}"

    def _say(self, message: str) -> None:
        self._last_said = time.monotonic()
        if self._rich is None and self.stream is not None:
            self.stream.write(f"{timestamp()} {self.phase}: {message}\n")
            self.stream.flush()

    def _heartbeat(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                quiet = time.monotonic() - self._last_said
                if quiet >= self.heartbeat_s and self._rich is None:
                    spent = time.monotonic() - self._phase_started
                    done = f", {self.completed} of {self.total} done" if self.total else ""
                    self._say(f"still {self.activity} ({spent:.0f} s in this phase{done})")

    @contextmanager
    def running(self) -> Iterator[Progress]:
        """Show progress meanwhile: listen to the steps, keep the display or heartbeat going."""
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(file=self.stream), transient=False)
            self._rich.start()
            self._task = self._rich.add_task(self._description(), total=None)
        self._thread = threading.Thread(target=self._heartbeat, name="progress", daemon=True)
        self._thread.start()
        try:
            with progress_listener(self.on_event):
                yield self
        finally:
            self._stop.set()
            self._thread.join()
            if self._rich is not None:
                if self._task is not None:  # the last phase ("done") shows as finished
                    self._rich.update(self._task, completed=self.total or 1,
                                      total=self.total or 1)
                self._rich.stop()
                self._rich = None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
