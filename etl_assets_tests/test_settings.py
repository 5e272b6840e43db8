"""Settings from the environment and flags, and the DuckDB limits they put on connections."""

from pathlib import Path

import pytest

from etl_assets.lib import warehouse
from etl_assets.lib.settings import EtlSettings, SettingsError


def test_defaults_live_in_git_ignored_var_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = EtlSettings.from_env(env={})
    assert s.shard_count == 10
    assert s.data_dir == str(tmp_path / "data")
    assert s.duckdb_path == str(tmp_path / "var" / "warehouse.duckdb")
    assert s.export_path == str(tmp_path / "var" / "merged_output.csv")
    assert s.snapshot_path == str(tmp_path / "var" / "warehouse.snapshot.duckdb")
    assert s.dagster_home == tmp_path / "var" / "dagster_home"
    assert s.chaos_fail_shard is None


def test_environment_then_flags(tmp_path):
    env = {"SHARD_COUNT": "4", "DATA_DIR": str(tmp_path / "in"), "CHAOS_FAIL_SHARD": "3",
           "DUCKDB_PATH": str(tmp_path / "w.duckdb")}
    s = EtlSettings.from_env(env=env)
    assert (s.shard_count, s.chaos_fail_shard) == (4, 3)
    assert s.duckdb_path == str(tmp_path / "w.duckdb")
    assert s.snapshot_path == str(tmp_path / "w.snapshot.duckdb")  # follows the warehouse
    s = EtlSettings.from_env(env=env, shard_count=8, data_dir=str(tmp_path / "other"))
    assert s.shard_count == 8 and s.data_dir == str(tmp_path / "other")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SHARD_COUNT": "ten"}, "SHARD_COUNT='ten' is not a number"),
        ({"SHARD_COUNT": "0"}, "SHARD_COUNT must be at least 1"),
        ({"CHAOS_FAIL_SHARD": "12"}, "CHAOS_FAIL_SHARD=12 is not a shard id"),
        ({"CHAOS_FAIL_MODE": "sometimes"}, "CHAOS_FAIL_MODE must be one of"),
        ({"MAX_REJECT_FRACTION": "2"}, "MAX_REJECT_FRACTION must be between 0 and 1"),
        ({"DUCKDB_MEMORY_LIMIT": "lots"}, "DUCKDB_MEMORY_LIMIT must look like 1GB or 512MB"),
        ({"DUCKDB_THREADS": "-1"}, "DUCKDB_THREADS must be >= 0"),
        ({"SHARD_RETRY_DELAY_S": "-1"}, "SHARD_RETRY_DELAY_S must be between 0 and 3600"),
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
