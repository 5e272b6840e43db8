"""The code location: every pipeline instance under etl_assets/pipelines/ (each a folder with
the `defs.yaml` of an `etl_assets.component.DeclaredPipeline`), loaded as Dagster components.

The shipped instance, `customers`, builds its definitions from the environment as `build_defs()`
does: this is where SHARD_COUNT (it decides the partitions) and CELERY_BROKER_URL (whether
launched runs send their steps to Celery workers, `defs.executor`) are read for the UI. The CLI
builds its own with `build_defs(settings)` so that flags can override the environment.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType

import dagster as dg

import etl_assets.pipelines
from etl_assets.component import build_defs

__all__ = ["build_defs", "build_location", "defs"]


def build_location(instances: ModuleType = etl_assets.pipelines) -> dg.Definitions:
    """The Definitions of every component instance under the package `instances`."""
    root = Path(etl_assets.pipelines.__file__).parent.parent.parent
    with warnings.catch_warnings():
        # Dagster's component loader calls its own preview and beta APIs: not ours to act on.
        warnings.simplefilter("ignore", dg.PreviewWarning)
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.ComponentTree.from_module(defs_module=instances, project_root=root).build_defs()


defs = build_location()
