"""The structured run events: one JSON line per shard attempt start, end or error, and per skip."""

from __future__ import annotations

import json
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
