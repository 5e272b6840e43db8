"""One pipeline's Definitions (`build_defs`), and the Dagster component that hosts a declared
pipeline in a code location (`DeclaredPipeline`, one instance per `defs.yaml`).

An instance's `defs.yaml` holds its declaration inline (`attributes.declaration`, the format of
etl_assets/customers.yaml; the pipeline is named after the instance's folder) or the path of a
declaration file relative to it (named after that file), and optionally `settings`: fields of
`EtlSettings` (data_dir, shard_count, ...), which win over the environment's. Without a
declaration it runs the environment's (ETL_PIPELINE, default the shipped customers.yaml): that
is the shipped instance, etl_assets/pipelines/customers, with today's keys and names. Another
pipeline's keys, jobs, sensors and resources carry its name, so instances merge in one location.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic
from pydantic import BaseModel, Field

from etl_assets.defs.contracts import names_for
from etl_assets.defs.executor import executor_for
from etl_assets.defs.profiles import build_profile_assets
from etl_assets.defs.resources import resources_for
from etl_assets.defs.sensors import build_sensors
from etl_assets.defs.shard_inputs import build_shard_inputs_asset
from etl_assets.defs.sources import build_source_assets
from etl_assets.lib import declaration_file, pipeline
from etl_assets.lib.settings import (
    ENV_VARS,
    EtlSettings,
    SettingsError,
    broker_url,
    set_in_environment,
)


def build_defs(settings: EtlSettings | None = None, broker: str | None = None, *,
               named: Mapping[str, str] | None = None) -> dg.Definitions:
    """Assemble the Definitions of the pipeline `settings` run (default: from the environment,
    with each value an environment variable gave configured as that variable; `named` says
    which fields those are when `settings` is given); with a Celery `broker` (default: from the
    environment when `settings` is too), launched runs execute their steps there."""
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
        resources=resources_for(settings, named=from_environment if named is None else named),
        executor=executor_for(broker),
    )


class ScaffoldParams(BaseModel):
    """`dg scaffold defs etl_assets.component.DeclaredPipeline <folder>` with either an existing
    declaration file, or a data folder and its key column to infer one from (etl-assets init)."""

    declaration: str | None = Field(default=None, description="A declaration file to host.")
    data_dir: str | None = Field(default=None, description="A folder of CSV files to infer "
                                 "the declaration from (with key).")
    key: str | None = Field(default=None, description="The join column every file carries.")


class DeclaredPipelineScaffolder(dg.Scaffolder[ScaffoldParams]):
    """Writes the new instance's defs.yaml (and with data_dir, its inferred declaration file
    `<folder>.yaml` beside it, so the pipeline is named after the folder)."""

    @classmethod
    def get_scaffold_params(cls) -> type[ScaffoldParams]:
        return ScaffoldParams

    def scaffold(self, request: dg.ScaffoldRequest[ScaffoldParams]) -> None:
        from etl_assets.tools import init  # the inference, only when scaffolding

        params, folder = request.params, request.target_path
        if params.data_dir and params.key and not params.declaration:
            out = folder / f"{folder.name}.yaml"
            init.init(params.data_dir, params.key, out)
            attributes = {"declaration": out.name, "settings": {"data_dir": params.data_dir}}
        elif params.declaration and not (params.data_dir or params.key):
            attributes = {"declaration": os.path.relpath(Path(params.declaration).resolve(),
                                                         folder.resolve())}
        else:
            raise SettingsError(f"{folder}: give either declaration (a declaration file) or "
                                "data_dir and key (a folder of CSV files to infer one from)")
        dg.scaffold_component(request, attributes)


# The settings an instance may give: every field but the declaration's (its own attribute).
SETTINGS = tuple(name for name in EtlSettings.model_fields if name != "pipeline")


@dg.scaffold_with(DeclaredPipelineScaffolder)
class DeclaredPipeline(dg.Component, dg.Model, dg.Resolvable):
    """A declared pipeline: its source assets, shard_inputs, the partitioned shard_profiles
    with its retry policy, the merged asset with its blocking checks, sensors, schedule, jobs
    and resources, built from one declaration."""

    declaration: str | dict[str, Any] | None = Field(
        default=None, description="The declaration inline (key, sources, prefer, macros, "
        "derived, export), or a declaration file's path relative to this defs.yaml; none: "
        "ETL_PIPELINE's, by default the shipped customers.yaml.")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="Settings of this pipeline (data_dir, shard_count, "
        "home_dir, ...; relative paths from the working directory, as the environment's); "
        "they win over the environment variables.")

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        here = context.path / pipeline.COMPONENT_FILE
        overrides = dict(self.settings)
        unknown = sorted(set(overrides) - set(SETTINGS))
        if unknown:
            raise SettingsError(f"{here}: settings.{unknown[0]}: not a setting (one of "
                                f"{', '.join(SETTINGS)})")
        if self.declaration is not None:
            overrides["pipeline"] = self._declaration_file(here)
        try:
            settings = EtlSettings.from_env(**overrides)
        except pydantic.ValidationError as exc:
            problem = exc.errors()[0]
            field = ".".join(str(part) for part in problem["loc"])
            raise SettingsError(f"{here}: settings.{field}: {problem['msg']}") from None
        except SettingsError as exc:
            # Worded for the environment variable ("SHARD_COUNT must be ..."): when this
            # instance gave the value, name its field here instead.
            variable, _, problem = str(exc).partition(" ")
            if ENV_VARS.get(variable) in overrides:
                raise SettingsError(f"{here}: settings.{ENV_VARS[variable]}: {problem}") from None
            raise
        # A value this instance gives is its own, not the environment variable's.
        named = {f: var for f, var in set_in_environment().items() if f not in overrides}
        return build_defs(settings, broker_url(), named=named)

    def _declaration_file(self, here: Path) -> str:
        """The declaration file: this defs.yaml itself (inline) or the file it names."""
        if isinstance(self.declaration, str):
            return str((here.parent / self.declaration).resolve())
        # Every process reads it from the file, where each field has its line for the errors.
        # Dagster's reading resolves templates; that reading does not, so none may be there.
        text = here.read_text(encoding="utf-8")
        if "{{" in _strings(declaration_file.parse(text, str(here), pipeline.INLINE).data):
            raise SettingsError(f"{here}: attributes.declaration: holds a template ({{{{ }}}}); "
                                "write the declaration without one")
        return str(here)


def _strings(data: object) -> str:
    """Every key and text value of parsed YAML, joined."""
    if isinstance(data, dict):
        return " ".join(_strings(k) + " " + _strings(v) for k, v in data.items())
    if isinstance(data, list):
        return " ".join(_strings(v) for v in data)
    return data if isinstance(data, str) else ""
