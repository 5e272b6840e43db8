"""Named points inside every write, where a test can make the process fail for real.

`ETL_CRASH_AT=<point>` (settings.crash_at) acts on reaching that point, as ETL_CRASH_MODE says:
- `kill` (default): the process SIGKILLs itself: no cleanup, no `finally`, exactly what a killed
  worker or a power cut leaves behind;
- `enospc`: the write raises `OSError(ENOSPC)`, as a full disk would in the middle of it; the
  code around the write must name the path and leave nothing half-done;
- `stop`: the process SIGSTOPs itself and waits there, holding whatever it holds, for a test to
  kill it from outside (a worker on another machine that dies in the middle of a write).
Production code calls `hook(point)` at each point; by default that does nothing.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable

Hook = Callable[[str], None]

# The points the kill drill (test_crash) walks, in the order a run reaches them.
CRASH_POINTS: tuple[str, ...] = (
    "source_before_publish",  # slices written under a temp name, not yet renamed into place
    "source_before_pointer",  # version directory published, pointer not yet moved
    "source_before_rejected",  # staged, rejected rows not yet replaced in the warehouse
    "shard_after_delete",  # inside the shard transaction: old rows deleted, new not inserted
    "shard_before_commit",  # new rows and manifest inserted, not committed
    "profiles_before_commit",  # snapshot + export temp files, table, manifest ready; no COMMIT
    # committed, export and snapshot temp files not yet renamed into place
    "export_before_rename",
)

# Where a full disk can strike: one point inside each kind of write. Two of them are not in
# the kill drill: killing there leaves what killing at a neighbouring point leaves.
ENOSPC_POINTS: tuple[str, ...] = (
    "dagster_home_write",  # the CLI creates the Dagster home's config and storage
    "source_before_publish",  # staging: slices written under a temp name
    "source_rejected_write",  # warehouse: inside the rejected-rows transaction
    "shard_before_commit",  # warehouse: inside the shard transaction
    "export_write",  # export: temp file written, inside the customer_profiles transaction
    "snapshot_write",  # snapshot: tables copied into its temp file, not yet committed there
)

# Where a test may run something concurrent in between (a hook that stages new data, say):
# killing or ENOSPC there would only repeat a neighbouring point.
INTERLEAVE_POINTS: tuple[str, ...] = (
    "shard_before_write",  # a shard's rows computed from its slices, warehouse not yet attached
)

# Where a test makes the data itself wrong, so that a check has to catch it: at these points
# ETL_CRASH_AT makes the code there produce the fault named (ETL_CRASH_MODE does not apply).
DATA_FAULT_POINTS: tuple[str, ...] = (
    "merge_duplicate",  # customer_profiles' merge writes one customer's row twice
)

FAULT_POINTS: tuple[str, ...] = CRASH_POINTS + tuple(
    p for p in ENOSPC_POINTS + INTERLEAVE_POINTS if p not in CRASH_POINTS) + DATA_FAULT_POINTS
CRASH_MODES: tuple[str, ...] = ("kill", "enospc", "stop")


class InjectedFault(Exception):  # noqa: N818 - a signal to the code at the point, not an error
    """Raised by a hook at a data fault point: the code there is to produce its fault."""


def no_hook(point: str) -> None:
    """The default hook: do nothing."""


def injected(hook: Hook, point: str) -> bool:
    """Call `hook` at the data fault `point`; True if it asks for the fault to be produced."""
    try:
        hook(point)
    except InjectedFault:
        return True
    return False


def crash_hook(crash_at: str, mode: str = "kill") -> Hook:
    """A hook that acts at `crash_at` as `mode` says (no-op when `crash_at` is empty)."""
    if not crash_at:
        return no_hook

    def hook(point: str) -> None:
        if point != crash_at:
            return
        if point in DATA_FAULT_POINTS:
            raise InjectedFault(point)
        if mode == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.kill(os.getpid(), signal.SIGSTOP if mode == "stop" else signal.SIGKILL)

    return hook
