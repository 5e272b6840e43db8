"""The code location loads, validates and has the shape tools depend on."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from etl_assets.definitions import build_defs, defs
from etl_assets.settings import EtlSettings

REPO = Path(__file__).resolve().parent.parent
DAGSTER = str(Path(sys.executable).parent / "dagster")


def test_dagster_definitions_validate_passes(tmp_path):
    env = dict(os.environ, DAGSTER_HOME=str(tmp_path))
    proc = subprocess.run(
        [DAGSTER, "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All code locations passed validation" in proc.stdout + proc.stderr


def test_asset_graph_shape():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"crm", "billing", "product", "support", "shard_inputs", "shard_profiles",
                    "customer_profiles"}
    for name in ("crm", "billing", "product", "support", "shard_inputs"):
        assert graph.get(dg.AssetKey(name)).group_name == "sources"
    shards = graph.get(dg.AssetKey("shard_profiles"))
    assert shards.group_name == "profiles"
    assert shards.partitions_def.get_partition_keys() == [str(k) for k in range(10)]
    # Shards depend on the per-shard observation, which depends on the four sources.
    assert {p.to_user_string() for p in shards.parent_keys} == {"shard_inputs"}
    inputs = graph.get(dg.AssetKey("shard_inputs"))
    assert inputs.partitions_def.get_partition_keys() == shards.partitions_def.get_partition_keys()
    assert {p.to_user_string() for p in inputs.parent_keys} == {"crm", "billing", "product", "support"}
    profiles = graph.get(dg.AssetKey("customer_profiles"))
    assert {p.to_user_string() for p in profiles.parent_keys} == {"shard_profiles"}


def test_retry_policy_only_on_shards():
    shard_def = defs.resolve_assets_def("shard_profiles")
    policy = shard_def.op.retry_policy
    assert policy.max_retries == 3 and 1 <= policy.delay <= 2
    assert policy.backoff == dg.Backoff.EXPONENTIAL and policy.jitter is not None
    for name in ("crm", "customer_profiles"):
        assert defs.resolve_assets_def(name).op.retry_policy is None


def test_profile_checks_are_blocking():
    specs = {
        spec.name: spec
        for checks_def in defs.asset_checks or []
        for spec in checks_def.check_specs
    }
    assert set(specs) == {"row_count_matches_sources", "no_duplicate_customer_id",
                          "idempotency_keys_unique", "shards_current"}
    assert all(spec.blocking for spec in specs.values())


def test_shard_count_drives_partitions(tmp_path):
    four = build_defs(EtlSettings.from_env(env={}, shard_count=4, home_dir=str(tmp_path)))
    keys = four.resolve_assets_def("shard_profiles").partitions_def.get_partition_keys()
    assert keys == ["0", "1", "2", "3"]
