"""Routing customers to shards.

The SQL twin of `shard_of` is the `etl_shard` macro in rules.py; a test holds them equal.
"""

from __future__ import annotations

import hashlib


def shard_of(customer_id: str, shard_count: int) -> int:
    """The public demo's routing: first 4 bytes of md5(customer_id), big-endian, mod shard_count."""
    return int.from_bytes(hashlib.md5(customer_id.encode("utf-8")).digest()[:4], "big") % shard_count

