"""The structured run events: one JSON line per shard attempt start, end or error, and per skip;
and the progress a step reports while it runs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# source_skip: etl-assets run found a source unchanged and did not stage it (no Dagster step).
SHARD_EVENTS = ("shard_start", "shard_end", "shard_skip", "shard_error", "source_skip")


def format_event(event: dict[str, Any]) -> str:
    """A shard event dict (with its "event" key) as the one JSON line users see (sorted keys)."""
    if event.get("event") not in SHARD_EVENTS:
        raise ValueError(f"unknown shard event {event.get('event')!r}")
    return json.dumps(event, sort_keys=True, default=str)


def parse_shard_event(message: str) -> dict[str, Any] | None:
    """The event dict if `message` is a shard event line, else None."""
    if not message.startswith("{"):
        return None
    try:
        data = json.loads(message)
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("event") in SHARD_EVENTS else None


# Progress: what a step is doing while it does it (a stage name and a few figures). The steps
# call `report_progress`; whoever runs them in this process (the `etl-assets run` command)
# listens. With nobody listening (the UI's runs, the tests' `materialize`) it costs nothing.
ProgressListener = Callable[[str, dict[str, Any]], None]
_listeners: list[ProgressListener] = []
# A forked worker process is not the process that listens.
os.register_at_fork(after_in_child=_listeners.clear)


def report_progress(stage: str, **fields: Any) -> None:
    """Tell this process's progress listeners that `stage` is under way (or done)."""
    for listener in list(_listeners):
        listener(stage, fields)


@contextmanager
def progress_listener(listener: ProgressListener) -> Iterator[None]:
    """Call `listener(stage, fields)` for every `report_progress` in this process meanwhile."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
