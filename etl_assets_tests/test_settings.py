"""Settings from the environment and flags, and the DuckDB limits they put on connections."""

import os
from pathlib import Path

import pytest

from etl_assets.lib import warehouse
from etl_assets.lib.settings import EtlSettings, SettingsError


def test_defaults_live_in_git_ignored_var_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = EtlSettings.from_env(env={})
    assert s.shard_count == 10
    assert s.data_dir == str(tmp_path / "data")
    assert s.database == str(tmp_path / "var" / "warehouse.duckdb")
    assert s.export_path == str(tmp_path / "var" / "merged_output.csv")
    assert s.snapshot_path == str(tmp_path / "var" / "warehouse.snapshot.duckdb")
    assert s.dagster_home == tmp_path / "var" / "dagster_home"
    assert s.chaos_fail_shard is None


def test_environment_then_flags(tmp_path):
    env = {"SHARD_COUNT": "4", "DATA_DIR": str(tmp_path / "in"), "CHAOS_FAIL_SHARD": "3",
           "DUCKDB_PATH": str(tmp_path / "w.duckdb")}
    s = EtlSettings.from_env(env=env)
    assert (s.shard_count, s.chaos_fail_shard) == (4, 3)
    assert s.database == str(tmp_path / "w.duckdb")
    assert s.snapshot_path == str(tmp_path / "w.snapshot.duckdb")  # follows the warehouse
    s = EtlSettings.from_env(env=env, shard_count=8, data_dir=str(tmp_path / "other"))
    assert s.shard_count == 8 and s.data_dir == str(tmp_path / "other")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SHARD_COUNT": "ten"}, "SHARD_COUNT='ten' is not a whole number"),
        ({"SHARD_COUNT": "0"}, "SHARD_COUNT must be at least 1"),
        ({"CHAOS_FAIL_SHARD": "12"}, "CHAOS_FAIL_SHARD=12 is not a shard id"),
        ({"CHAOS_FAIL_MODE": "sometimes"}, "CHAOS_FAIL_MODE must be one of"),
        ({"MAX_REJECT_FRACTION": "2"}, "MAX_REJECT_FRACTION must be between 0 and 1"),
        ({"DUCKDB_MEMORY_LIMIT": "lots"}, "DUCKDB_MEMORY_LIMIT must look like 1GB or 512MB"),
        ({"DUCKDB_THREADS": "-1"}, "DUCKDB_THREADS must be >= 0"),
        ({"SHARD_RETRY_DELAY_S": "-1"}, "SHARD_RETRY_DELAY_S must be between 0 and 3600"),
        # Issue 31, finding 4: each of these was a traceback, or silently read.
        ({"DUCKDB_THREADS": "-3"}, "DUCKDB_THREADS must be >= 0"),
        ({"MAX_REJECT_FRACTION": "abc"}, "MAX_REJECT_FRACTION='abc' is not a number"),
        ({"MAX_REJECT_FRACTION": "nan"}, "MAX_REJECT_FRACTION='nan' is not a finite number"),
        ({"MAX_REJECT_FRACTION": "inf"}, "MAX_REJECT_FRACTION='inf' is not a finite number"),
        ({"ETL_AUTOMATION": "x"}, "ETL_AUTOMATION must be on or off"),
        ({"ETL_FORCE": "maybe"}, "ETL_FORCE='maybe' is not a switch"),
        ({"LOCK_TIMEOUT_S": "0"}, "LOCK_TIMEOUT_S must be more than 0"),
        ({"LOCK_TIMEOUT_S": "-5"}, "LOCK_TIMEOUT_S must be more than 0"),
        ({"LOCK_TIMEOUT_S": "inf"}, "LOCK_TIMEOUT_S='inf' is not a finite number"),
    ],
)
def test_bad_values_are_named(env, message):
    with pytest.raises(SettingsError, match=message):
        EtlSettings.from_env(env=env)


def test_duckdb_limits_reach_every_heavy_connection(tmp_path):
    """The limits are applied by DuckDB itself (read back from the connection), and the spill
    folder lives under ETL_HOME."""
    s = EtlSettings.from_env(env={"DUCKDB_MEMORY_LIMIT": "512MB", "DUCKDB_THREADS": "1",
                                  "ETL_HOME": str(tmp_path / "home")})
    db = str(tmp_path / "w.duckdb")
    with warehouse.scratch(s.duckdb_limits) as con:
        limit, threads, temp = con.execute(
            "SELECT current_setting('memory_limit'), current_setting('threads'), "
            "current_setting('temp_directory')").fetchone()
    assert limit == "488.2 MiB"  # DuckDB reads 512MB as 512 * 10^6 bytes
    assert int(threads) == 1
    # Each connection spills to a folder of its own under ETL_HOME, removed when it closes.
    assert Path(temp).parent == tmp_path / "home" / "duckdb_tmp"
    assert not Path(temp).exists()
    with warehouse.scratch(s.duckdb_limits) as one, warehouse.scratch(s.duckdb_limits) as two:
        first, second = (c.execute("SELECT current_setting('temp_directory')").fetchone()[0]
                         for c in (one, two))
        assert first != second and Path(first).is_dir() and Path(second).is_dir()
    with warehouse.reader(db, 5, s.duckdb_limits) as con:
        assert int(con.execute("SELECT current_setting('threads')").fetchone()[0]) == 1
    with warehouse.scratch() as con:  # no limits: DuckDB's own defaults
        assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0] != limit
        # Long queries must not draw DuckDB's progress bar into the CLI's output.
        assert con.execute("SELECT current_setting('enable_progress_bar')").fetchone()[0] is False


@pytest.mark.parametrize("word, value", [("1", True), ("TRUE", True), ("yes", True), ("on", True),
                                         ("0", False), ("false", False), ("No", False),
                                         ("off", False)])
def test_switches_take_the_documented_spellings(word, value):
    assert EtlSettings.from_env(env={"ETL_FORCE": word}).force is value


def _layout(tmp_path: Path) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("crm", "billing", "product", "support"):
        (data / f"{name}.csv").write_text("customer_id\n", encoding="utf-8")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "crm.csv").symlink_to(data / "crm.csv")
    return {"DATA_DIR": str(data), "ETL_HOME": str(tmp_path / "var")}


@pytest.mark.parametrize("env, first, second", [
    ({"EXPORT_PATH": "{data}/crm.csv"}, "export", "source file (crm)"),
    ({"EXPORT_PATH": "{tmp}/links/crm.csv"}, "export", "source file (crm)"),  # a symlink
    ({"EXPORT_PATH": "{tmp}/var/../data/./billing.csv"}, "export", "source file (billing)"),
    ({"EXPORT_PATH": "{tmp}/var/warehouse.duckdb"}, "export", "warehouse"),
    ({"EXPORT_PATH": "{tmp}/var/warehouse.snapshot.duckdb"}, "export", "snapshot"),
    ({"EXPORT_PATH": "{tmp}/var/staging/out.csv"}, "export", "staging"),
    ({"EXPORT_PATH": "{tmp}/var/duckdb_tmp/out.csv"}, "export", "spill folder"),
    ({"DUCKDB_PATH": "{data}/crm.csv"}, "warehouse", "source file (crm)"),
    ({"DUCKDB_PATH": "{tmp}/links/crm.csv"}, "warehouse", "source file (crm)"),
    ({"STAGING_DIR": "{data}"}, "staging", "source file (crm)"),
    ({"STAGING_DIR": "{tmp}"}, "export", "staging"),  # everything else lives under it
    ({"STAGING_DIR": "{tmp}/var/dagster_home"}, "staging", "Dagster home"),
])
def test_a_write_that_would_land_on_an_input_or_kept_state_is_refused(tmp_path, env, first,
                                                                      second):
    """Issue 31, finding 1: every write target is resolved (symlinks, `..`) and held against
    every input and every kept path before anything runs; one line names both."""
    base = _layout(tmp_path)
    values = {k: v.format(data=base["DATA_DIR"], tmp=tmp_path) for k, v in env.items()}
    with pytest.raises(SettingsError) as caught:
        EtlSettings.from_env(env={**base, **values})
    message = str(caught.value)
    assert message.startswith(first) and f"would overwrite {second}" in message, message
    assert "\n" not in message


def test_hard_links_are_refused_only_where_the_file_is_written_in_place(tmp_path):
    base = _layout(tmp_path)
    linked = tmp_path / "linked.csv"
    os.link(Path(base["DATA_DIR"]) / "crm.csv", linked)
    # The export is written to a new file and renamed: the input keeps its bytes.
    EtlSettings.from_env(env={**base, "EXPORT_PATH": str(linked)})
    # DuckDB writes the warehouse in place: it would change the input through the link.
    with pytest.raises(SettingsError, match="warehouse .* would overwrite source file"):
        EtlSettings.from_env(env={**base, "DUCKDB_PATH": str(linked)})
    # The default layout and an export beside the sources are fine.
    EtlSettings.from_env(env=base)
    EtlSettings.from_env(env={**base, "EXPORT_PATH": str(Path(base["DATA_DIR"]) / "out.csv")})

