"""Configuration, defined once: four concerns' settings (warehouse, staging, faults,
automation), each field with its default, its description and its environment variable.

Inside Dagster each concern is a resource of that very class (`etl_assets.defs.resources`
subclasses them), configured with `dg.EnvVar` where the environment sets a value; a step hands
the library `EtlSettings.of(...)` its resources. The CLI builds the same from the environment
and its flags (`EtlSettings.from_env`). This is the one module that reads the environment.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from etl_assets.lib import ducklake, pipeline, secrets, targets
from etl_assets.lib.declaration import Declaration
from etl_assets.lib.faults import CRASH_MODES, FAULT_POINTS, Hook, crash_hook
from etl_assets.lib.limits import DEFAULT_MEMORY_LIMIT, DuckDBLimits

# Environment variable -> settings field. CLI flags override these.
ENV_VARS: dict[str, str] = {
    "DATA_DIR": "data_dir",
    "ETL_PIPELINE": "pipeline",
    "ETL_HOME": "home_dir",
    "DUCKDB_PATH": "database",
    "DUCKLAKE_DATA_PATH": "ducklake_data_path",
    "STAGING_DIR": "staging_dir",
    "EXPORT_PATH": "export_path",
    "SHARD_COUNT": "shard_count",
    "SHARD_RETRY_DELAY_S": "shard_retry_delay_s",
    "CHAOS_FAIL_SHARD": "chaos_fail_shard",
    "CHAOS_FAIL_MODE": "chaos_fail_mode",
    "MAX_REJECT_FRACTION": "max_reject_fraction",
    "LOCK_TIMEOUT_S": "lock_timeout_s",
    "ETL_CRASH_AT": "crash_at",
    "ETL_CRASH_MODE": "crash_mode",
    "SENSOR_INTERVAL_S": "sensor_interval_s",
    "RERUN_MAX_ATTEMPTS": "rerun_max_attempts",
    "RERUN_BASE_WAIT_S": "rerun_base_wait_s",
    "ETL_AUTOMATION": "automation",
    "ETL_FORCE": "force",
    "DUCKDB_MEMORY_LIMIT": "memory_limit",
    "DUCKDB_THREADS": "threads",
}

# The deployment's variables, read here like every other (tools/instance.py and
# defs/executor.py use them): the Dagster instance in PostgreSQL, the Celery broker.
PG_URL_VAR = "DAGSTER_PG_URL"
# SQLAlchemy 2.1 reads a bare postgresql:// URL as the psycopg (3) driver; dagster-postgres
# depends on psycopg2 and recognizes only psycopg2's errors when it retries its table creation.
PG_SCHEME = "postgresql+psycopg2://"
BROKER_VAR = "CELERY_BROKER_URL"
BROKER_SCHEMES = ("redis://", "rediss://", "amqp://", "pyamqp://")
DAGSTER_HOME_VAR = "DAGSTER_HOME"

DEFAULT_HOME = "var"
CHAOS_MODES = ("once", "always")


class SettingsError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


class WarehouseSettings(BaseModel):
    """The warehouse, and what each of its DuckDB connections may use."""

    # A DuckDB file, or a DuckLake catalog (ducklake:postgres:<libpq string>) whose table data
    # lives under ducklake_data_path, a folder every writer shares.
    database: str = Field(default="", description="The warehouse: a DuckDB file or a DuckLake "
                          "catalog (DUCKDB_PATH).")
    ducklake_data_path: str = Field(
        default="", description="With a ducklake: database, the shared folder of its data.")
    lock_timeout_s: float = Field(default=60.0, description="Longest wait for the file lock (s).")
    # Beyond it DuckDB spills to <home>/duckdb_tmp instead of growing (limits.DEFAULT_MEMORY_LIMIT).
    memory_limit: str = Field(default=DEFAULT_MEMORY_LIMIT,
                              description="Per DuckDB connection, then spill.")
    threads: int = Field(default=0, description="DuckDB threads per connection (0: per core).")


class StagingSettings(BaseModel):
    """Where the sources are read, staged per shard and exported, and what a source may reject."""

    data_dir: str = Field(default="data", description="The folder holding the source files.")
    # A StagingSettings field, so every step's settings (EtlSettings.of) follow the same file.
    pipeline: str = Field(default="", description="The declaration file the run follows "
                          "(ETL_PIPELINE; empty: the shipped customers.yaml).")
    home_dir: str = Field(default=DEFAULT_HOME,
                          description="The run's home: the spill folder and the run lock.")
    staging_dir: str = Field(default="", description="Per-source, per-shard staged versions.")
    export_path: str = Field(default="", description="merged_output.csv, replaced atomically.")
    max_reject_fraction: float = Field(default=0.01, description="Above it a source fails.")
    force: bool = Field(default=False, description="Recompute even what is unchanged.")


class FaultSettings(BaseModel):
    """The chaos drill and the crash points; all off by default."""

    chaos_fail_shard: int | None = Field(default=None, description="Shard that fails.")
    chaos_fail_mode: str = Field(default="once", description="once or always.")
    crash_at: str = Field(default="", description="A named write point to crash at.")
    crash_mode: str = Field(default="kill", description="kill, enospc or stop.")


class AutomationSettings(BaseModel):
    """What the sensors may launch on their own."""

    automation: str = Field(default="on", description="on or off: sensors start running.")
    sensor_interval_s: int = Field(default=30, description="Seconds between sensor ticks.")
    rerun_max_attempts: int = Field(default=2, description="Re-runs of a failed shard.")
    rerun_base_wait_s: float = Field(default=30.0, description="First wait before a re-run.")


# The settings of each concern; inside Dagster each is a resource of that class (defs.resources).
CONCERNS: tuple[type[BaseModel], ...] = (
    WarehouseSettings, StagingSettings, FaultSettings, AutomationSettings)


class EtlSettings(WarehouseSettings, StagingSettings, FaultSettings, AutomationSettings):
    """Every concern's settings in one object, plus what is fixed when the definitions are
    built: the library's one configuration.

    Paths are absolute once built through `from_env`, so the UI shows exactly what a run used.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Fixed when the definitions load: the partitions and the shard retry policy's first wait
    # (then x2 each retry, +/- 1 s of jitter). Not in any resource.
    shard_count: int = 10
    shard_retry_delay_s: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> EtlSettings:
        """Build settings from environment variables, then apply non-None `overrides` (CLI flags)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for var, field in ENV_VARS.items():
            raw = env.get(var, "").strip()
            if raw:
                values[field] = _parse(var, field, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**_resolve_paths(values)).validated()

    @classmethod
    def of(cls, shard_count: int, *parts: BaseModel) -> EtlSettings:
        """The settings some concerns' objects hold (a resource is one), resolved and validated
        like `from_env` but with no environment read; a concern not given keeps its defaults."""
        values: dict[str, Any] = {}
        for part in parts:
            for concern in CONCERNS:
                if isinstance(part, concern):
                    values.update({name: getattr(part, name) for name in concern.model_fields})
        return cls.from_env(env={}, shard_count=shard_count, **values)

    def part(self, concern: type[BaseModel]) -> dict[str, Any]:
        """One concern's fields and their values here: what its resource is built from."""
        return {name: getattr(self, name) for name in concern.model_fields}

    def validated(self) -> EtlSettings:
        """Raise `SettingsError` naming the bad value; return self when everything is usable."""
        if self.shard_count < 1:
            raise SettingsError(f"SHARD_COUNT must be at least 1, got {self.shard_count}")
        if not 0 <= self.shard_retry_delay_s <= 3600:
            raise SettingsError(
                f"SHARD_RETRY_DELAY_S must be between 0 and 3600, got {self.shard_retry_delay_s}")
        if self.chaos_fail_mode not in CHAOS_MODES:
            raise SettingsError(
                f"CHAOS_FAIL_MODE must be one of {', '.join(CHAOS_MODES)}, got {self.chaos_fail_mode!r}"
            )
        if self.chaos_fail_shard is not None and not 0 <= self.chaos_fail_shard < self.shard_count:
            raise SettingsError(
                f"CHAOS_FAIL_SHARD={self.chaos_fail_shard} is not a shard id (0..{self.shard_count - 1})"
            )
        for name in ("shard_retry_delay_s", "max_reject_fraction", "lock_timeout_s",
                     "rerun_base_wait_s"):
            if not math.isfinite(getattr(self, name)):
                raise SettingsError(f"{_var(name)} must be a finite number, got {getattr(self, name)}")
        if not 0 <= self.max_reject_fraction <= 1:
            raise SettingsError(
                f"MAX_REJECT_FRACTION must be between 0 and 1, got {self.max_reject_fraction}"
            )
        if self.sensor_interval_s < 1 or self.rerun_max_attempts < 0 or self.rerun_base_wait_s < 0:
            raise SettingsError(
                "SENSOR_INTERVAL_S must be >= 1, RERUN_MAX_ATTEMPTS and RERUN_BASE_WAIT_S >= 0"
            )
        if not 0 < self.lock_timeout_s <= 86400:
            raise SettingsError(
                f"LOCK_TIMEOUT_S must be more than 0 and at most 86400 (a day), got {self.lock_timeout_s}")
        if self.automation not in ("on", "off"):
            raise SettingsError(f"ETL_AUTOMATION must be on or off, got {self.automation!r}")
        if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", self.memory_limit.strip(), re.I):
            raise SettingsError(
                f"DUCKDB_MEMORY_LIMIT must look like 1GB or 512MB, got {self.memory_limit!r}"
            )
        if self.threads < 0:
            raise SettingsError(f"DUCKDB_THREADS must be >= 0, got {self.threads}")
        if ducklake.is_ducklake(self.database):
            problem = ducklake.problem(self.database, self.ducklake_data_path)
            if problem:
                raise SettingsError(problem)
        if "?" in self.database:
            # DuckDB reads what follows a "?" in a database path as connection options.
            raise SettingsError(
                f"DUCKDB_PATH cannot contain '?' (DuckDB reads it as the start of connection "
                f"options), got {self.database!r}"
            )
        if self.crash_at and self.crash_at not in FAULT_POINTS:
            raise SettingsError(
                f"ETL_CRASH_AT must be one of {', '.join(FAULT_POINTS)}, got {self.crash_at!r}"
            )
        if self.crash_mode not in CRASH_MODES:
            raise SettingsError(
                f"ETL_CRASH_MODE must be one of {', '.join(CRASH_MODES)}, got {self.crash_mode!r}"
            )
        self.declaration  # noqa: B018 -- loads and checks it: SettingsError in one line
        problem = targets.collision(self.writes, self.reads)
        if problem:
            raise SettingsError(problem)
        return self

    @property
    def writes(self) -> list[targets.Place]:
        """Every path a run writes (the export, the warehouse and its WAL, the snapshot, staging,
        the export's parts, the spill folder, the run lock, the default Dagster home)."""
        Place = targets.Place
        if self.on_ducklake:
            warehouse = [Place("DUCKLAKE_DATA_PATH", Path(self.ducklake_data_path), folder=True)]
        else:
            warehouse = [Place("warehouse (DUCKDB_PATH)", Path(self.database), in_place=True),
                         Place("warehouse WAL", Path(f"{self.database}.wal"), in_place=True)]
        return [
            Place("export (EXPORT_PATH / --export)", Path(self.export_path)),
            *warehouse,
            Place("snapshot", Path(self.snapshot_path)),
            Place("staging (STAGING_DIR)", Path(self.staging_dir), folder=True),
            Place("export parts", Path(self.export_parts_dir), folder=True),
            Place("spill folder", Path(self.duckdb_limits.temp_directory), folder=True),
            Place("run lock", Path(self.run_lock_path)),
            Place("Dagster home", self.dagster_home, folder=True),
        ]

    @property
    def reads(self) -> list[targets.Place]:
        """The files a run reads: the declaration and the source files (what it keeps is among
        `writes`)."""
        declaration = [targets.Place("declaration (ETL_PIPELINE / --pipeline)",
                                     Path(self.pipeline))] if self.pipeline else []
        return declaration + [
            targets.Place(f"source file ({source.name})", Path(self.data_dir) / source.filename)
            for source in self.declaration.sources]

    @property
    def declaration(self) -> Declaration:
        """The declaration this run follows (`pipeline`), loaded once per process per content."""
        return pipeline.declaration(self.pipeline)

    @property
    def pipeline_name(self) -> str:
        """The pipeline's name: its declaration file's stem (`customers` when shipped)."""
        return pipeline.name(self.pipeline)

    @property
    def profiles_table(self) -> str:
        """The merged table: `customer_profiles` (shipped) or `profiles` (another pipeline)."""
        return pipeline.profiles_table(self.pipeline)

    @property
    def pipeline_dir(self) -> Path:
        """The folder of what is this pipeline's own by default: the home for the shipped one,
        `<home>/pipelines/<name>` for another."""
        return pipeline.folder(Path(self.home_dir), self.pipeline)

    @property
    def run_lock_path(self) -> str:
        """The lock one `etl-assets run` of this pipeline holds (one run per pipeline at once)."""
        return str(self.pipeline_dir / ".run.lock")

    def field_values(self) -> dict[str, Any]:
        """Every field's value, by name (what a copy of these settings is built from)."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    def replace(self, **changes: Any) -> EtlSettings:
        """A copy with some fields changed, validated."""
        return type(self)(**{**self.field_values(), **changes}).validated()

    @property
    def hook(self) -> Hook:
        """The fault hook for this configuration (does nothing unless ETL_CRASH_AT is set)."""
        return crash_hook(self.crash_at, self.crash_mode)

    @property
    def shard_ids(self) -> list[int]:
        """Every shard id, in order."""
        return list(range(self.shard_count))

    @property
    def duckdb_limits(self) -> DuckDBLimits:
        """Memory limit, threads and spill folder for the heavy DuckDB connections."""
        return DuckDBLimits(self.memory_limit.strip(), self.threads,
                            str(self.pipeline_dir / "duckdb_tmp"))

    @property
    def on_ducklake(self) -> bool:
        """True if the warehouse is a DuckLake catalog rather than a DuckDB file."""
        return ducklake.is_ducklake(self.database)

    @property
    def warehouse_dir(self) -> str:
        """The folder the warehouse writes its files to: the DuckDB file's, or the lake's data."""
        if self.on_ducklake:
            return self.ducklake_data_path
        return str(Path(self.database).parent)

    @property
    def snapshot_path(self) -> str:
        """The read-only copy of the tables users query: open it during a run.

        Next to a warehouse file (`warehouse.duckdb` -> `warehouse.snapshot.duckdb`), named
        after it so two warehouses in one folder never share one. A DuckLake warehouse has no
        file of its own, and its data folder belongs to DuckLake: the snapshot goes next to
        the export it is published with (`merged_output.csv` -> `merged_output.snapshot.duckdb`).
        """
        beside = Path(self.export_path if self.on_ducklake else self.database)
        return str(beside.with_name(f"{beside.stem}.snapshot.duckdb"))

    @property
    def export_parts_dir(self) -> str:
        """Where the export's per-shard sorted parts are kept between runs."""
        return str(self.pipeline_dir / "export_parts")

    @property
    def dagster_home(self) -> Path:
        """The default Dagster home inside the git-ignored folder (DAGSTER_HOME wins when set)."""
        return Path(self.home_dir) / "dagster_home"


# The spellings a switch (ETL_FORCE) accepts; anything else is refused, not read as off.
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _parse(var: str, field: str, raw: str) -> Any:
    """The one parser of an environment value: `raw` as the field's type, or SettingsError
    with one line naming the variable. Numbers must be finite (nan and inf are refused)."""
    annotation = EtlSettings.model_fields[field].annotation
    if annotation in (int, int | None):
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{var}={raw!r} is not a whole number") from None
    if annotation is float:
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{var}={raw!r} is not a number") from None
        if not math.isfinite(value):
            raise SettingsError(f"{var}={raw!r} is not a finite number")
        return value
    if annotation is bool:
        word = raw.lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise SettingsError(f"{var}={raw!r} is not a switch: use one of "
                                f"{', '.join(TRUE_WORDS)} or {', '.join(FALSE_WORDS)}")
        return word in TRUE_WORDS
    return raw


def _var(field: str) -> str:
    """The environment variable behind a settings field."""
    return next(var for var, name in ENV_VARS.items() if name == field)


def _resolve_paths(values: dict[str, Any]) -> dict[str, Any]:
    home = Path(values.get("home_dir") or DEFAULT_HOME).resolve()
    own = values.get("pipeline") or ""
    own = "" if pipeline.is_shipped(own) else str(Path(own).resolve())
    folder = pipeline.folder(home, own)
    defaults = {
        "database": folder / "warehouse.duckdb",
        "staging_dir": folder / "staging",
        "export_path": folder / "merged_output.csv",
    }
    out = dict(values, home_dir=str(home), pipeline=own)
    out["data_dir"] = str(Path(values.get("data_dir") or "data").resolve())
    for field, default in defaults.items():
        out[field] = str(Path(values[field]).resolve()) if values.get(field) else str(default)
    if ducklake.is_ducklake(values.get("database") or ""):
        out["database"] = values["database"]  # a catalog, not a path: taken as written
    if values.get("ducklake_data_path"):
        out["ducklake_data_path"] = str(Path(values["ducklake_data_path"]).resolve())
    return out


def pg_url(env: Mapping[str, str] | None = None) -> str | None:
    """DAGSTER_PG_URL, checked (SettingsError naming the variable, never its value), or None."""
    url = (os.environ if env is None else env).get(PG_URL_VAR, "").strip()
    if not url:
        return None
    if url.startswith(("postgresql://", "postgres://")):
        raise SettingsError(
            f"{PG_URL_VAR} must start with {PG_SCHEME} (SQLAlchemy 2.1 reads a bare "
            "postgresql:// URL as the psycopg 3 driver, which dagster-postgres does not use)")
    if not url.startswith(PG_SCHEME):
        raise SettingsError(f"{PG_URL_VAR} must be a {PG_SCHEME}user@host:port/database URL")
    credentials = url[len(PG_SCHEME):].rsplit("@", 1)[0] if "@" in url else ""
    if set(credentials) & set("@/?#"):
        # The driver would cut the URL at that character and print the rest of the password
        # as a host name or a port.
        raise SettingsError(f"{PG_URL_VAR}: the user or password holds an unencoded '@', '/', "
                            "'?' or '#': percent-encode it (%40, %2F, %3F, %23)")
    return url


def broker_url(env: Mapping[str, str] | None = None) -> str | None:
    """CELERY_BROKER_URL, checked (SettingsError naming the variable, not its value), or None."""
    url = (os.environ if env is None else env).get(BROKER_VAR, "").strip()
    if not url:
        return None
    if not url.startswith(BROKER_SCHEMES):
        raise SettingsError(f"{BROKER_VAR} must be a broker URL starting with one of "
                            f"{', '.join(BROKER_SCHEMES)}")
    return url


def dagster_home_override(env: Mapping[str, str] | None = None) -> str | None:
    """DAGSTER_HOME when the environment sets it (it wins over the home's default)."""
    return (os.environ if env is None else env).get(DAGSTER_HOME_VAR, "").strip() or None


def set_in_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Settings field -> the variable that sets it, for each variable set (non-blank)."""
    env = os.environ if env is None else env
    return {field: var for var, field in ENV_VARS.items() if env.get(var, "").strip()}


def secrets_in_environment(env: Mapping[str, str] | None = None) -> list[str]:
    """Every password the environment holds, and its pieces: what output must never show."""
    return secrets.known_secrets(os.environ if env is None else env)

