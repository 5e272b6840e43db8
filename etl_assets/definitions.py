"""The code location: every asset, check, job and resource of etl_assets, assembled here.

`defs` is built from the environment (SHARD_COUNT decides the partitions); the CLI builds its
own with `build_defs(settings)` so flags can override the environment.
"""

from __future__ import annotations

from typing import Optional

import dagster as dg

from etl_assets.checks import customer_profiles_checks
from etl_assets.profiles import SHARDS_JOB, build_profile_assets
from etl_assets.sensors import build_sensors
from etl_assets.shard_inputs import build_shard_inputs_asset
from etl_assets.settings import EtlSettings
from etl_assets.sources import SOURCE_ASSETS

SOURCES_JOB = "sources_job"
PROFILES_JOB = "profiles_job"


def build_defs(settings: Optional[EtlSettings] = None) -> dg.Definitions:
    """Assemble the Definitions for `settings` (default: from the environment)."""
    settings = settings or EtlSettings.from_env()
    shard_profiles, customer_profiles = build_profile_assets(settings.shard_count)
    jobs = [
        dg.define_asset_job(
            SOURCES_JOB, selection=dg.AssetSelection.groups("sources"),
            description="Read, validate and stage the four source files, then record "
            "each shard's slices (shard_inputs).",
        ),
        dg.define_asset_job(
            SHARDS_JOB, selection=dg.AssetSelection.assets(shard_profiles),
            description="Build one shard partition of shard_profiles.",
        ),
        dg.define_asset_job(
            PROFILES_JOB, selection=dg.AssetSelection.assets(customer_profiles),
            description="Merge every shard into customer_profiles, export, and run its checks.",
        ),
    ]
    sensors_and_schedule = build_sensors(settings)
    return dg.Definitions(
        assets=[*SOURCE_ASSETS, build_shard_inputs_asset(settings.shard_count), shard_profiles,
                customer_profiles],
        sensors=[d for d in sensors_and_schedule if isinstance(d, dg.SensorDefinition)],
        schedules=[d for d in sensors_and_schedule if isinstance(d, dg.ScheduleDefinition)],
        asset_checks=[customer_profiles_checks],
        jobs=jobs,
        resources={"settings": settings},
    )


defs = build_defs()
