"""Named points inside every write, where a test can make the process die for real.

`ETL_CRASH_AT=<point>` (settings.crash_at) makes the process SIGKILL itself on reaching that
point: no cleanup, no `finally`, exactly what a killed worker or a power cut leaves behind.
Production code calls `hook(point)` at each point; by default that does nothing.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

Hook = Callable[[str], None]

CRASH_POINTS: tuple[str, ...] = (
    "source_before_publish",  # slices written under a temp name, not yet renamed into place
    "source_before_pointer",  # version directory published, pointer not yet moved
    "source_before_rejected",  # staged, rejected rows not yet replaced in the warehouse
    "shard_after_delete",  # inside the shard transaction: old rows deleted, new not inserted
    "shard_before_commit",  # new rows and manifest inserted, not committed
    "profiles_before_commit",  # customer_profiles rebuilt inside its transaction, not committed
    "export_before_rename",  # export written to its temp file, not yet renamed
)


def no_hook(point: str) -> None:
    """The default hook: do nothing."""


def crash_hook(crash_at: str) -> Hook:
    """A hook that SIGKILLs this process at `crash_at` (no-op when empty)."""
    if not crash_at:
        return no_hook

    def hook(point: str) -> None:
        if point == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
