"""`shard_inputs`: the staged slices of each shard, with one data version per partition.

Why this asset exists: the four sources are whole files, so their data version (the file's
sha256) changes for every shard when one row changes. Dagster judges a partition stale from its
*direct* dependencies, so `shard_profiles` depends on this partitioned asset instead, whose
partition k carries the hash of shard k's four slices. After the sources are staged again,
exactly the shard partitions whose slices changed show as stale in the UI.

Its step reads the four staged pointers (no data). The slices of every shard change together
when a source is staged, so one step records every partition: the run's own partition (if any)
is the step's result, the others are logged as materializations with their own data version.
Backfills and "Materialize all" treat it as the ordinary asset it is, so sources → shard_inputs
→ shard_profiles keeps its order in every kind of run.
"""


import hashlib

import dagster as dg

from etl_assets.defs.contracts import (
    DATA_VERSION_TAG,
    names_for,
    not_retryable,
    shard_partitions,
)
from etl_assets.defs.resources import resource_keys, resources_of
from etl_assets.lib.settings import EtlSettings
from etl_assets.lib.sources import read_shard_inputs
from etl_assets.lib.staging import StagingError

# Bump when the meaning of a shard_inputs data version changes.
SHARD_INPUTS_VERSION = "1"


def _metadata(input_hash: str, rows: dict[str, int]) -> dict[str, object]:
    return {"source_data_hash": input_hash, **{f"rows_{name}": n for name, n in rows.items()}}


def build_shard_inputs_asset(settings: EtlSettings) -> dg.AssetsDefinition:
    """The partitioned `shard_inputs` asset (downstream of the pipeline's sources)."""
    shard_count, names = settings.shard_count, names_for(settings)
    partitions = shard_partitions(shard_count)

    @dg.asset(
        key=names.shard_inputs,
        deps=list(names.sources.values()),
        partitions_def=partitions,
        group_name=names.name("sources"),
        kinds={"parquet"},
        owners=["team:data-platform"],
        code_version=SHARD_INPUTS_VERSION,
        description=(
            "The Parquet slices each shard reads, one partition per shard. Partition k's data "
            "version is the hash of shard k's four slices, so after the sources are staged only "
            "the shards whose slices changed become stale."
        ),
        required_resource_keys=resource_keys(names, "warehouse", "staging"),
    )
    def shard_inputs(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        if context.has_partition_key_range and not context.has_partition_key:
            raise not_retryable(ValueError(
                "materialize shard_inputs for one partition or for all (no partition), not a "
                "range: a range would share one data version"))
        own = context.partition_key if context.has_partition_key else None
        try:
            inputs = read_shard_inputs(EtlSettings.of(
                shard_count, *resources_of(context, names, "warehouse", "staging")))
        except StagingError as exc:
            raise not_retryable(exc) from exc
        for k, (input_hash, rows) in inputs.items():
            if str(k) != own:
                context.log_event(dg.AssetMaterialization(
                    asset_key=names.shard_inputs, partition=str(k),
                    tags={DATA_VERSION_TAG: input_hash}, metadata=_metadata(input_hash, rows)))
        if own is not None:
            input_hash, rows = inputs[int(own)]
            return dg.MaterializeResult(data_version=dg.DataVersion(input_hash),
                                        metadata=_metadata(input_hash, rows))
        # An unpartitioned run (the sources job) also gets one whole-asset event for the step's
        # result; it carries the hash of every shard's version.
        combined = hashlib.sha256("|".join(h for h, _ in inputs.values()).encode()).hexdigest()
        return dg.MaterializeResult(data_version=dg.DataVersion(combined),
                                    metadata={"shards": len(inputs)})

    return shard_inputs
