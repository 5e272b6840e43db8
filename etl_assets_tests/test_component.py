"""The declared pipeline as a Dagster component (etl_assets.component.DeclaredPipeline): the
shipped code location keeps its names; a project with a second instance (the fleet of
test_other_domain, inline in its defs.yaml) loads both side by side through Dagster's own
component loading, `dg list defs`, `dg check defs`, `dg scaffold defs` and the webserver."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from etl_assets.component import build_defs
from etl_assets.lib.settings import EtlSettings
from etl_assets_tests.conftest import SAMPLE, free_port, process_group, wait_for_webserver
from etl_assets_tests.test_other_domain import FLEET, HEADER, SHARDS, write_fleet

BIN = Path(sys.executable).parent
SHIPPED_KEYS = {"crm", "billing", "product", "support", "shard_inputs", "shard_profiles",
                "customer_profiles"}
FLEET_KEYS = {"fleet/vehicles", "fleet/trips", "fleet/services", "fleet/shard_inputs",
              "fleet/shard_profiles", "fleet/profiles"}
CONCERNS = {"warehouse", "staging", "faults", "automation"}
TYPE = "etl_assets.component.DeclaredPipeline"


def _names(defs: dg.Definitions) -> dict[str, set[str]]:
    return {
        "assets": {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()},
        "jobs": {j.name for j in defs.jobs or []},
        "sensors": {s.name for s in defs.sensors or []},
        "schedules": {s.name for s in defs.schedules or []},
        "resources": set(defs.resources or {}),
    }


def test_the_shipped_location_is_the_customers_instance_with_todays_names():
    from etl_assets import definitions

    shipped = Path(definitions.__file__).parent / "pipelines" / "customers" / "defs.yaml"
    assert f"type: {TYPE}" in shipped.read_text(encoding="utf-8")
    names = _names(definitions.defs)
    assert names["assets"] == SHIPPED_KEYS
    assert names["jobs"] == {"sources_job", "shards_job", "profiles_job"}
    assert names["resources"] == CONCERNS
    # The same as the plain assembly from the environment, nothing more.
    assert names == _names(build_defs())


def _project(root: Path, package: str, env_home: Path) -> Path:
    """A dg project `package` whose defs folder holds the customers instance (the sample) and
    the fleet instance, its declaration inline in its defs.yaml."""
    project = root / package
    defs = project / package / "defs"
    for folder in ("customers", "fleet"):
        (defs / folder).mkdir(parents=True)
    (project / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [project]
        name = "{package}"
        version = "0.0.0"

        [tool.dg]
        directory_type = "project"

        [tool.dg.project]
        root_module = "{package}"
        """), encoding="utf-8")
    for init in (project / package / "__init__.py", defs / "__init__.py"):
        init.write_text("", encoding="utf-8")
    (project / package / "definitions.py").write_text(textwrap.dedent("""\
        from pathlib import Path

        import dagster as dg

        defs = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
        """), encoding="utf-8")
    data = root / "data"
    if not data.exists():
        shutil.copytree(SAMPLE, data)
        write_fleet(root / "fleet_data")
    (defs / "customers" / "defs.yaml").write_text(textwrap.dedent(f"""\
        type: {TYPE}
        attributes:
          settings:
            data_dir: {data}
            home_dir: {env_home}
        """), encoding="utf-8")
    (defs / "fleet" / "defs.yaml").write_text(textwrap.dedent(f"""\
        type: {TYPE}
        attributes:
          settings:
            data_dir: {root / "fleet_data"}
            home_dir: {env_home}
            shard_count: {SHARDS}
            shard_retry_delay_s: 0.05
          declaration:
        """) + textwrap.indent(FLEET, "    "), encoding="utf-8")
    return project


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """No pipeline variable from the caller's environment; a temp Dagster home; the env for dg."""
    for var in ("SHARD_COUNT", "CHAOS_FAIL_SHARD", "CHAOS_FAIL_MODE", "DATA_DIR", "EXPORT_PATH",
                "ETL_PIPELINE", "DUCKDB_PATH", "STAGING_DIR", "ETL_HOME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return {**os.environ, "VIRTUAL_ENV": sys.prefix, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "ETL_AUTOMATION": "off"}


def _dg(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dg"), *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=180)


def _load(project: Path, package: str, monkeypatch: pytest.MonkeyPatch) -> dg.Definitions:
    """The project's Definitions through Dagster's component loading, in this process."""
    monkeypatch.syspath_prepend(str(project))
    return dg.load_from_defs_folder(path_within_project=project)


@pytest.mark.cli
def test_two_instances_list_and_check_side_by_side(tmp_path, clean_env):
    project = _project(tmp_path, "twopipes", tmp_path / "var")
    listed = _dg(project, clean_env, "list", "defs", "--json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    found = json.loads(listed.stdout)
    assert {a["asset_key"] for a in found["assets"]} == SHIPPED_KEYS | FLEET_KEYS
    assert {r["name"] for r in found["resources"]} == CONCERNS | {f"fleet_{c}" for c in CONCERNS}
    assert {j["name"] for j in found["jobs"]} >= {"sources_job", "fleet_sources_job",
                                                  "fleet_shards_job", "fleet_profiles_job"}
    assert {s["name"] for s in found["sensors"]} >= {"source_files_sensor",
                                                     "fleet_source_files_sensor"}
    # Each asset points at its own instance's defs.yaml.
    sources = {a["asset_key"]: a.get("source", "") for a in found["assets"]}
    assert sources["fleet/profiles"].startswith("twopipes/defs/fleet/defs.yaml")
    assert sources["crm"].startswith("twopipes/defs/customers/defs.yaml")

    checked = _dg(project, clean_env, "check", "defs")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully." in checked.stdout + checked.stderr


@pytest.mark.cli
def test_the_fleet_instance_materializes_its_export(tmp_path, clean_env, monkeypatch):
    """The fleet instance's jobs, run through Dagster from the component-loaded location,
    write the export `etl-assets run --pipeline` writes for the same declaration, byte for byte."""
    project = _project(tmp_path, "fleetrun", tmp_path / "var")
    defs = _load(project, "fleetrun", monkeypatch)
    with dg.DagsterInstance.get() as instance:
        assert defs.resolve_job_def("fleet_sources_job").execute_in_process(
            instance=instance).success
        for shard in range(SHARDS):
            assert defs.resolve_job_def("fleet_shards_job").execute_in_process(
                instance=instance, partition_key=str(shard)).success
        assert defs.resolve_job_def("fleet_profiles_job").execute_in_process(
            instance=instance).success
        # The customer pipeline, beside it in the same home, was not run.
        assert instance.get_latest_materialization_event(dg.AssetKey("crm")) is None
    export = tmp_path / "var" / "pipelines" / "fleet" / "merged_output.csv"
    assert export.read_text(encoding="utf-8").splitlines()[0].split(",") == HEADER
    assert not (tmp_path / "var" / "merged_output.csv").exists()

    declaration = tmp_path / "cli" / "fleet.yaml"
    declaration.parent.mkdir()
    declaration.write_text(FLEET, encoding="utf-8")
    cli = subprocess.run(
        [str(BIN / "etl-assets"), "run", "--pipeline", str(declaration), "--data-dir",
         str(tmp_path / "fleet_data"), "--shards", str(SHARDS)],
        cwd=tmp_path / "cli", env={**clean_env, "ETL_HOME": str(tmp_path / "cli" / "var")},
        capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    by_cli = tmp_path / "cli" / "var" / "pipelines" / "fleet" / "merged_output.csv"
    assert export.read_bytes() == by_cli.read_bytes()


@pytest.mark.cli
def test_an_invalid_inline_declaration_fails_dg_check_with_its_one_line(tmp_path, clean_env):
    project = _project(tmp_path, "badpipes", tmp_path / "var")
    fleet = project / "badpipes" / "defs" / "fleet" / "defs.yaml"
    text = fleet.read_text(encoding="utf-8")
    fleet.write_text(text.replace("price: {kind: money, min: 0}", "price: {kind: cash, min: 0}"),
                     encoding="utf-8")
    line = next(n for n, row in enumerate(fleet.read_text().splitlines(), 1) if "price:" in row)
    checked = _dg(project, clean_env, "check", "defs")
    assert checked.returncode != 0
    expected = (f"{fleet}:{line}: sources.vehicles.columns.price.kind: unknown kind 'cash' "
                "(one of id, text, int, decimal, money, date, category)")
    assert any(row.endswith(expected) for row in (checked.stdout + checked.stderr).splitlines()), \
        checked.stdout + checked.stderr


def test_an_unknown_setting_fails_with_one_line(tmp_path, clean_env, monkeypatch):
    project = _project(tmp_path, "badsetting", tmp_path / "var")
    fleet = project / "badsetting" / "defs" / "fleet" / "defs.yaml"
    fleet.write_text(fleet.read_text().replace("shard_count:", "shards:"), encoding="utf-8")
    with pytest.raises(Exception) as failed:
        _load(project, "badsetting", monkeypatch)
    cause = failed.value.__cause__
    assert str(cause).startswith(f"{fleet}: settings.shards: not a setting (one of ")
    assert "\n" not in str(cause)
    # A value the settings refuse is named as the instance's field, not as its variable.
    fleet.write_text(fleet.read_text().replace("shards:", "shard_count: 0 #"), encoding="utf-8")
    with pytest.raises(Exception) as failed:
        _load(project, "badsetting", monkeypatch)
    assert str(failed.value.__cause__) == f"{fleet}: settings.shard_count: must be at least 1, got 0"


def test_a_template_in_an_inline_declaration_fails_with_one_line(tmp_path, clean_env, monkeypatch):
    """Dagster resolves templates in attributes, but every process reads the declaration from
    the file: a template there is refused, not read two ways."""
    project = _project(tmp_path, "templated", tmp_path / "var")
    fleet = project / "templated" / "defs" / "fleet" / "defs.yaml"
    fleet.write_text(fleet.read_text().replace("mileage: fleet_band(km)",
                                               "mileage: \"fleet_band({{ 'km' }})\""),
                     encoding="utf-8")
    with pytest.raises(Exception) as failed:
        _load(project, "templated", monkeypatch)
    assert str(failed.value.__cause__) == (
        f"{fleet}: attributes.declaration: holds a template ({{{{ }}}}); write the declaration "
        "without one")


@pytest.mark.cli
def test_dg_scaffold_defs_creates_an_instance(tmp_path, clean_env, monkeypatch):
    """`dg scaffold defs` with a data folder and its key writes the instance's defs.yaml and
    the declaration `etl-assets init` infers, beside it; the project then loads it too."""
    project = _project(tmp_path, "scaffolded", tmp_path / "var")
    made = _dg(project, clean_env, "scaffold", "defs", TYPE, "vans",
               "--data-dir", str(tmp_path / "fleet_data"), "--key", "vehicle_id")
    assert made.returncode == 0, made.stdout + made.stderr
    folder = project / "scaffolded" / "defs" / "vans"
    written = folder / "defs.yaml"
    assert f"type: {TYPE}" in written.read_text(encoding="utf-8")
    assert "declaration: vans.yaml" in written.read_text(encoding="utf-8")
    assert (folder / "vans.yaml").read_text(encoding="utf-8").startswith(
        "# A declaration inferred by `etl-assets init`")
    names = _names(_load(project, "scaffolded", monkeypatch))
    assert {f"vans/{s}" for s in ("vehicles", "trips", "services", "profiles")} <= names["assets"]
    assert names["assets"] >= SHIPPED_KEYS | FLEET_KEYS
    assert "vans_warehouse" in names["resources"]


@pytest.mark.daemon
def test_the_webserver_shows_both_instances(tmp_path, clean_env):
    """`dagster dev` on the two-instance project: its GraphQL asset graph holds both."""
    project = _project(tmp_path, "uipipes", tmp_path / "var")
    port = free_port()
    with process_group([str(BIN / "dagster"), "dev", "-m", "uipipes.definitions", "-h",
                        "127.0.0.1", "-p", str(port)],
                       tmp_path / "dev.log", cwd=project, env=clean_env) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_for_webserver(url, proc, tmp_path / "dev.log")
        query = "{ assetNodes { assetKey { path } groupName } }"
        request = urllib.request.Request(url + "/graphql", data=json.dumps({"query": query}).encode(),
                                         headers={"Content-Type": "application/json"})
        nodes = json.load(urllib.request.urlopen(request, timeout=60))["data"]["assetNodes"]
    groups = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in nodes}
    assert set(groups) == SHIPPED_KEYS | FLEET_KEYS
    assert groups["crm"] == "sources" and groups["fleet/vehicles"] == "fleet_sources"
    assert groups["fleet/profiles"] == "fleet_profiles"


def test_settings_are_the_environments_but_an_instances_own(tmp_path, clean_env, monkeypatch):
    """A value the instance gives wins over the environment's, and is not shown as the
    variable: ETL_PIPELINE and DATA_DIR set for the shell do not reach the fleet instance.
    With a Celery broker, both instances' runs use the one executor it configures."""
    other = tmp_path / "other.yaml"
    other.write_text(FLEET, encoding="utf-8")
    monkeypatch.setenv("ETL_PIPELINE", str(other))
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
    project = _project(tmp_path, "envpipes", tmp_path / "var")
    fleet = project / "envpipes" / "defs" / "fleet" / "defs.yaml"
    defs = _load(project, "envpipes", monkeypatch)
    staging = defs.resources["fleet_staging"]
    assert staging.pipeline == str(fleet) and staging.data_dir == str(tmp_path / "fleet_data")
    # The customers instance gives no declaration: it follows ETL_PIPELINE, as the shipped
    # location does, so this project holds two prefixed pipelines.
    assert EtlSettings.from_env().pipeline_name == "other"
    assert "other/vehicles" in _names(defs)["assets"]
    assert defs.executor is not None and defs.executor.name == "celery"
