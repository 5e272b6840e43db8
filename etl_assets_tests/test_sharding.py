import hashlib

import duckdb

from etl_assets.defs.contracts import shard_partitions
from etl_assets.lib.rules import install_rules
from etl_assets.lib.sharding import shard_of


def _formula(customer_id: str, n: int) -> int:
    return int.from_bytes(hashlib.md5(customer_id.encode()).digest()[:4], "big") % n


def test_known_ids_route_like_the_public_demo():
    # md5("cust_00000001") = 82d97aeb...; 0x82d97aeb = 2195290859 -> 9 of 10, 3 of 4.
    assert shard_of("cust_00000001", 10) == 9
    assert shard_of("cust_00000001", 4) == 2195290859 % 4
    ids = [f"cust_{i:08d}" for i in range(1, 2001)] + ["Müller-7", "", "x" * 300]
    for n in (1, 4, 10, 16):
        assert [shard_of(c, n) for c in ids] == [_formula(c, n) for c in ids]


def test_sql_routing_equals_python_routing():
    ids = [f"cust_{i:08d}" for i in range(1, 5001)] + ["Ōkami", "café"]
    con = duckdb.connect()
    install_rules(con)
    got = con.execute(
        "SELECT etl_shard(unnest($ids), 10)", {"ids": ids}
    ).fetchall()
    assert [r[0] for r in got] == [shard_of(c, 10) for c in ids]


def test_every_shard_gets_customers_and_partitions_are_string_ids():
    counts = [0] * 10
    for i in range(1, 10001):
        counts[shard_of(f"cust_{i:08d}", 10)] += 1
    assert min(counts) > 800  # md5 spreads evenly
    assert shard_partitions(10).get_partition_keys() == [str(k) for k in range(10)]
