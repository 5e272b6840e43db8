"""The code location: every asset, check, job, sensor and resource of etl_assets, assembled here.

`defs` is built from the environment; this is the one place SHARD_COUNT is read for the
definitions (it decides the partitions), and CELERY_BROKER_URL (it decides whether launched
runs send their steps to Celery workers, `defs.executor`). The CLI builds its own with
`build_defs(settings)` so that flags can override the environment.
"""

from __future__ import annotations

import dagster as dg

from etl_assets.defs.contracts import names_for
from etl_assets.defs.executor import executor_for
from etl_assets.defs.profiles import build_profile_assets
from etl_assets.defs.resources import resources_for
from etl_assets.defs.sensors import build_sensors
from etl_assets.defs.shard_inputs import build_shard_inputs_asset
from etl_assets.defs.sources import build_source_assets
from etl_assets.lib.settings import EtlSettings, broker_url


def build_defs(settings: EtlSettings | None = None, broker: str | None = None) -> dg.Definitions:
    """Assemble the Definitions for `settings` (default: from the environment, with each value
    an environment variable gave configured as that variable); with a Celery `broker` (default:
    from the environment when `settings` is too), launched runs execute their steps there."""
    from_environment = settings is None
    if from_environment and broker is None:
        broker = broker_url()
    settings = settings or EtlSettings.from_env()
    names = names_for(settings)
    shard_profiles, customer_profiles = build_profile_assets(settings)
    jobs = [
        dg.define_asset_job(
            names.sources_job, selection=dg.AssetSelection.groups(names.name("sources")),
            description="Read, validate and stage the source files, then record "
            "each shard's slices (shard_inputs).",
        ),
        dg.define_asset_job(
            names.shards_job, selection=dg.AssetSelection.assets(shard_profiles),
            description="Build one shard partition of shard_profiles.",
        ),
        dg.define_asset_job(
            names.profiles_job, selection=dg.AssetSelection.assets(customer_profiles),
            description=f"Merge every shard into {names.profiles.to_user_string()}, export, "
            "and run its checks.",
        ),
    ]
    sensors_and_schedule = build_sensors(settings)
    return dg.Definitions(
        assets=[*build_source_assets(settings), build_shard_inputs_asset(settings),
                shard_profiles, customer_profiles],
        sensors=[d for d in sensors_and_schedule if isinstance(d, dg.SensorDefinition)],
        schedules=[d for d in sensors_and_schedule if isinstance(d, dg.ScheduleDefinition)],
        jobs=jobs,
        resources=resources_for(settings, named=from_environment),
        executor=executor_for(broker),
    )


defs = build_defs()
