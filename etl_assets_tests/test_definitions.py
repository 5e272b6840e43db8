"""The code location loads, validates and has the shape tools depend on."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from etl_assets.definitions import build_defs, defs
from etl_assets.lib.settings import EtlSettings

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


def test_dg_check_and_list_defs_pass(tmp_path):
    """`dg` reads [tool.dg] in pyproject.toml: the same code location as workspace.yaml."""
    dg_cli = str(Path(sys.executable).parent / "dg")
    env = dict(os.environ, DAGSTER_HOME=str(tmp_path))
    check = subprocess.run([dg_cli, "check", "defs"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "All definitions loaded successfully" in check.stdout + check.stderr
    listed = subprocess.run([dg_cli, "list", "defs", "--json"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    for name in ("shard_profiles", "customer_profiles", "source_files_sensor", "warehouse"):
        assert f'"{name}"' in listed.stdout


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
    # Declared by the asset itself: it evaluates them before it publishes (write, audit,
    # publish), so a failed check leaves the previous table and export.
    specs = {spec.name: spec for spec in defs.resolve_assets_def("customer_profiles").check_specs}
    assert set(specs) == {"row_count_matches_sources", "no_duplicate_customer_id",
                          "idempotency_keys_unique", "shards_current", "export_matches_table"}
    assert all(spec.blocking for spec in specs.values())


def test_shard_count_drives_partitions(tmp_path):
    four = build_defs(EtlSettings.from_env(env={}, shard_count=4, home_dir=str(tmp_path)))
    keys = four.resolve_assets_def("shard_profiles").partitions_def.get_partition_keys()
    assert keys == ["0", "1", "2", "3"]


def test_resources_are_typed_and_name_their_environment_variables(tmp_path, monkeypatch):
    """Four resources, the warehouse on dagster-duckdb's DuckDBResource, each one concern's
    settings class: every setting is defined once. A value that came from the environment is
    configured as that variable, and a step's settings round-trip."""
    from dagster_duckdb import DuckDBResource

    from etl_assets.defs.resources import RESOURCE_TYPES, WarehouseResource, resources_for
    from etl_assets.lib.settings import CONCERNS

    assert set(defs.resources) == set(RESOURCE_TYPES) == {"warehouse", "staging", "faults",
                                                           "automation"}
    assert isinstance(defs.resources["warehouse"], DuckDBResource)
    monkeypatch.setenv("DUCKDB_PATH", str(tmp_path / "wh.duckdb"))
    monkeypatch.setenv("CHAOS_FAIL_MODE", "always")
    monkeypatch.setenv("SENSOR_INTERVAL_S", "45")
    monkeypatch.setenv("MAX_REJECT_FRACTION", "0.5")
    from_env = resources_for(EtlSettings.from_env(), named=True)
    assert from_env["warehouse"].database == dg.EnvVar("DUCKDB_PATH")
    assert from_env["faults"].chaos_fail_mode == dg.EnvVar("CHAOS_FAIL_MODE")
    assert from_env["automation"].sensor_interval_s == dg.EnvVar.int("SENSOR_INTERVAL_S")
    assert from_env["staging"].max_reject_fraction == 0.5  # a fraction: the parsed value
    assert from_env["staging"].data_dir == str(REPO / "data")  # not set: the resolved value
    # Each resource is exactly one concern; the concerns share no field and, with the two
    # fixed when the definitions are built, are every field of the settings.
    owners = {key: [c for c in CONCERNS if issubclass(cls, c)] for key, cls in RESOURCE_TYPES.items()}
    assert sorted(len(found) for found in owners.values()) == [1, 1, 1, 1]
    assert {found[0] for found in owners.values()} == set(CONCERNS)
    fields = [name for concern in CONCERNS for name in concern.model_fields]
    assert len(fields) == len(set(fields))
    assert set(EtlSettings.model_fields) == set(fields) | {"shard_count", "shard_retry_delay_s"}
    settings = EtlSettings.from_env(env={}, home_dir=str(tmp_path), shard_count=3,
                                    chaos_fail_shard=1, force=True, lock_timeout_s=5)
    built = resources_for(settings)
    assert isinstance(built["warehouse"], WarehouseResource)
    assert EtlSettings.of(3, *built.values()) == settings


def test_library_imports_neither_dagster_nor_defs_nor_tools():
    """The three rooms: lib imports nothing from Dagster, defs or tools; defs nothing from
    tools. Checked on the source (every import statement), not on what happens to load."""
    import ast

    def imports(path: Path) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
        return found

    banned = {"lib": ("dagster", "dagster_duckdb", "etl_assets.defs", "etl_assets.definitions",
                      "etl_assets.tools"),
              "defs": ("etl_assets.tools",)}
    checked = 0
    for room, prefixes in banned.items():
        for path in sorted((REPO / "etl_assets" / room).glob("*.py")):
            checked += 1
            wrong = sorted(m for m in imports(path)
                           if any(m == p or m.startswith(p + ".") for p in prefixes))
            assert wrong == [], f"{path.relative_to(REPO)} imports {wrong}"
    assert checked >= 20


def test_no_module_over_500_lines():
    """Issue 32's bound: a module a newcomer reads whole; past it, split along its seams."""
    sizes = {path.relative_to(REPO): len(path.read_text(encoding="utf-8").splitlines())
             for path in (REPO / "etl_assets").rglob("*.py")}
    assert len(sizes) >= 40
    assert {path: n for path, n in sizes.items() if n > 500} == {}


def test_nothing_private_of_another_library():
    """Issue 32: no module of etl_assets imports a private module or name of another library
    (`dagster._core...`, `from dagster import _check`), and none reads or calls a
    leading-underscore attribute that etl_assets does not define itself (`pool._processes`,
    `threading._shutdown`, a Dagster base class's `self._instance`). Checked on the source.
    A `dagster.yaml` `module:` string naming a documented class is text, not an import."""
    import ast

    # Documented as public despite the underscore: os._exit (the process ends, no clean-up).
    public = {"_exit"}

    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    trees = {path: ast.parse(path.read_text(encoding="utf-8"))
             for path in sorted((REPO / "etl_assets").rglob("*.py"))}
    ours = set()  # every underscore name etl_assets defines: functions, classes, attributes
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                ours.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                ours.add(node.attr)
    wrong = []
    for path, tree in trees.items():
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                names = []
            wrong += [f"{where}:{node.lineno} imports {name}" for name in names
                      if not name.startswith("etl_assets")
                      and any(private(part) for part in name.split("."))]
            if isinstance(node, ast.Attribute):
                attr = node.attr
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1 \
                    and isinstance(node.args[1], ast.Constant):  # getattr(pool, "_processes")
                attr = str(node.args[1].value)
            else:
                continue
            if private(attr) and attr not in ours | public:
                wrong.append(f"{where}:{node.lineno} uses {ast.unparse(node)}")
    assert not wrong, "\n".join(wrong)
    assert len(trees) >= 40


def test_the_executor_is_chosen_by_the_broker_setting(tmp_path):
    """Without CELERY_BROKER_URL launched runs execute their steps in process; with one, every
    job sends its steps to Celery; a URL that is no broker's is refused, naming the variable."""
    from etl_assets.lib.settings import SettingsError, broker_url

    settings = EtlSettings.from_env(env={}, home_dir=str(tmp_path))
    default = build_defs(settings)
    celery = build_defs(settings, broker="redis://127.0.0.1:6379/0")
    for job in ("sources_job", "shards_job", "profiles_job"):
        assert default.resolve_job_def(job).executor_def.name == "in_process"
        assert celery.resolve_job_def(job).executor_def.name == "celery"
    assert broker_url({}) is None
    with pytest.raises(SettingsError, match="^CELERY_BROKER_URL must be a broker URL"):
        broker_url({"CELERY_BROKER_URL": "http://example"})


def test_one_module_reads_the_environment():
    """Settings are read from the environment in lib/settings.py only (issue 32, item 3): a
    value read anywhere else would escape its one parser and its checks. Setting a variable
    for a child process, or handing the whole environment to one, is not reading a setting."""
    import re

    reading = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[[^\]]+\](?!\s*=[^=])")
    package = REPO / "etl_assets"
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for path in sorted(package.rglob("*.py")) if path.name != "settings.py"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if reading.search(line)]
    assert found == []
