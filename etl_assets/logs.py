"""The structured run events: one JSON line per shard attempt start, end or error, and per skip."""

from __future__ import annotations

import json
from typing import Any

import dagster as dg

# source_skip: etl-assets run found a source unchanged and did not stage it (no Dagster step).
SHARD_EVENTS = ("shard_start", "shard_end", "shard_skip", "shard_error", "source_skip")


def format_event(event: dict[str, Any]) -> str:
    """A shard event dict (with its "event" key) as the one JSON line users see (sorted keys)."""
    if event.get("event") not in SHARD_EVENTS:
        raise ValueError(f"unknown shard event {event.get('event')!r}")
    return json.dumps(event, sort_keys=True, default=str)


def shard_event(context: dg.AssetExecutionContext, event: str, **fields: Any) -> str:
    """Log one shard event as a single JSON line (sorted keys) to the run's log; return the line.

    shard_skip ends an attempt that found nothing to do (the shard is already current).
    """
    line = format_event({"event": event, **fields})
    if event == "shard_error":
        context.log.error(line)
    else:
        context.log.info(line)
    return line


def parse_shard_event(message: str) -> dict[str, Any] | None:
    """The event dict if `message` is a shard event line, else None."""
    if not message.startswith("{"):
        return None
    try:
        data = json.loads(message)
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("event") in SHARD_EVENTS else None
