"""The deployment files under docs/deploy agree with the code they deploy.

There is no Docker daemon or Kubernetes here, so the images are not built; what can be checked
is: every variable they set is one the code reads, the warehouse paths they give pass the same
validation a run applies, the Compose instance file loads in Dagster with our run queue, and the
names that tie the files together (network, volume, image, coordinator, partition tag) match.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import dagster as dg
import yaml

from etl_assets.defs.contracts import PARTITION_TAG
from etl_assets.lib.limits import memory_bytes
from etl_assets.lib.settings import BROKER_VAR, ENV_VARS, PG_URL_VAR, EtlSettings
from etl_assets.tools.instance import EtlRunCoordinator
from etl_assets_tests.conftest import REPO

DEPLOY = REPO / "docs" / "deploy"
# Set by a deployment but not pipeline settings: Dagster's instance, libpq's password, the
# image the DockerRunLauncher starts, the Celery broker.
PLATFORM_VARS = {PG_URL_VAR, "PGPASSWORD", "DAGSTER_CURRENT_IMAGE", BROKER_VAR}


def _yaml(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text(encoding="utf-8"))


def _compose_env() -> dict[str, str]:
    return {k: str(v) for k, v in _yaml("docker-compose.yml")["x-etl-env"].items()}


def _helm_env() -> dict[str, str]:
    (deployment,) = _yaml("helm-values.yaml")["dagster-user-deployments"]["deployments"]
    return {k: str(v) for k, v in deployment["env"].items()}


def _settings_from(env: dict[str, str]) -> EtlSettings:
    return EtlSettings.from_env({k: v for k, v in env.items() if k in ENV_VARS}).validated()


def test_every_variable_the_deployment_sets_is_one_the_code_reads() -> None:
    launcher_vars = set(_yaml("dagster.yaml")["run_launcher"]["config"]["env_vars"])
    for where, names in {"compose": set(_compose_env()), "helm": set(_helm_env()),
                         "dagster.yaml env_vars": launcher_vars}.items():
        unknown = names - set(ENV_VARS) - PLATFORM_VARS
        assert not unknown, f"{where} sets variables nothing reads: {sorted(unknown)}"
    # Every pipeline setting Compose gives the services also reaches the run containers.
    assert {k for k in _compose_env() if k in ENV_VARS} <= launcher_vars
    assert {PG_URL_VAR, "PGPASSWORD"} <= launcher_vars


def test_the_warehouse_settings_pass_the_checks_a_run_applies() -> None:
    for env in (_compose_env(), _helm_env()):
        settings = _settings_from(env)
        assert settings.on_ducklake and settings.ducklake_data_path
        assert "password" not in settings.database.lower()
        # DuckDB is told less memory than its container has: Python and Dagster need the rest.
        assert memory_bytes(settings.memory_limit) > 0


def test_the_compose_instance_loads_in_dagster_with_our_run_queue(tmp_path: Path) -> None:
    config = _yaml("dagster.yaml")
    assert config["storage"]["postgres"]["postgres_url"] == {"env": PG_URL_VAR}
    assert not re.search(r"postgresql(\+psycopg2)?://[^$\s]*:[^@\s]+@",
                         (DEPLOY / "dagster.yaml").read_text()), "a password in dagster.yaml"
    launcher = config.pop("run_launcher")
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    # dagster-docker is only in the image (the deploy extra), and Postgres is the storage there;
    # everything else in the file is loaded by Dagster as it is.
    del config["storage"]
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert isinstance(instance.run_coordinator, EtlRunCoordinator)
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == config["run_coordinator"]["config"]["max_concurrent_runs"]
        (limit,) = queue.tag_concurrency_limits
        assert limit["key"] == PARTITION_TAG and limit["limit"] == 1
        assert instance.run_monitoring_enabled and instance.run_retries_enabled

    compose = _yaml("docker-compose.yml")
    assert launcher["config"]["network"] == compose["networks"]["etl"]["name"]
    volume, mount = launcher["config"]["container_kwargs"]["volumes"][0].split(":")
    assert volume == compose["volumes"]["shared"]["name"]
    assert all(v.startswith(mount) for k, v in _compose_env().items()
               if k in {"DATA_DIR", "STAGING_DIR", "DUCKLAKE_DATA_PATH", "EXPORT_PATH"})
    # Four runs of DUCKDB_MEMORY_LIMIT each fit their container limit.
    container = launcher["config"]["container_kwargs"]
    assert memory_bytes(_compose_env()["DUCKDB_MEMORY_LIMIT"]) < memory_bytes(
        container["mem_limit"].upper() + "B")
    assert int(_compose_env()["DUCKDB_THREADS"]) * 10**9 == container["nano_cpus"]


def test_the_helm_values_launch_runs_as_jobs_sized_for_their_duckdb() -> None:
    values = _yaml("helm-values.yaml")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    coordinator = values["dagsterDaemon"]["runCoordinator"]["config"]["customRunCoordinator"]
    assert (coordinator["module"], coordinator["class"]) == (
        EtlRunCoordinator.__module__, EtlRunCoordinator.__name__)
    (limit,) = coordinator["config"]["tag_concurrency_limits"]
    assert limit["key"] == PARTITION_TAG and limit["limit"] == 1
    resources = (values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
                 ["containerConfig"]["resources"])
    assert resources["requests"] == resources["limits"], "requests = limits: no overcommit"
    env = _helm_env()
    assert int(env["DUCKDB_THREADS"]) == int(resources["limits"]["cpu"])
    pod_bytes = int(resources["limits"]["memory"].removesuffix("Gi")) * 2**30
    assert memory_bytes(env["DUCKDB_MEMORY_LIMIT"]) < pod_bytes
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert values["dagsterWebserver"]["image"] == deployment["image"]
    assert deployment["image"]["tag"] != "latest"


def test_the_image_installs_the_deploy_extra_and_serves_the_definitions() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert 'pip install ".[deploy]"' in dockerfile
    assert '"-m", "etl_assets.definitions"' in dockerfile
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    integrations = {re.sub(r"==.*", "", d): d.split("==")[1] for d in project["dependencies"]
                    if d.startswith("dagster-")}
    for pin in project["optional-dependencies"]["deploy"]:
        name, version = pin.split("==")
        # Dagster's integrations move as a set: the same 0.29.N as the ones already pinned.
        assert version == integrations["dagster-duckdb"], pin
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert copied.startswith("--") or f"!{copied.rstrip('/')}" in ignore.replace("/\n", "\n"), copied
