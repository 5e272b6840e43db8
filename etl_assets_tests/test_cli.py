"""The commands a user types: `etl-assets run` and `dagster asset materialize`."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from etl_assets.tools import cli
from etl_assets_tests.conftest import REPO

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.cli


def _env(tmp_path, **extra):
    env = dict(os.environ)
    for var in ("SHARD_COUNT", "CHAOS_FAIL_SHARD", "CHAOS_FAIL_MODE", "DATA_DIR", "EXPORT_PATH"):
        env.pop(var, None)
    env.update(DAGSTER_HOME=str(tmp_path / "dagster_home"), ETL_HOME=str(tmp_path / "var"), **extra)
    return env


def test_chaos_drill_acceptance(tmp_path, sample_dir):
    out = tmp_path / "out.csv"
    proc = subprocess.run(
        [str(BIN / "etl-assets"), "run", "--data-dir", str(sample_dir), "--export", str(out)],
        cwd=tmp_path, env=_env(tmp_path, CHAOS_FAIL_SHARD="3"),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    crm_lines = (sample_dir / "crm.csv").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(crm_lines) == 1001
    ids = [ln.split(",", 1)[0] for ln in lines[1:]]
    assert len(ids) == len(set(ids))
    stdout = proc.stdout
    assert ('"attempt": 1, "error": "ChaosFailure: chaos: shard 3 fails on attempt 1", '
            '"event": "shard_error"') in stdout
    assert '"attempt": 2, "elapsed_ms"' in stdout and '"event": "shard_end", "record_count"' in stdout
    assert "check shards_current" in stdout and "FAILED" not in stdout
    assert f"export: {out}" in stdout
    # Every run is recorded in the Dagster home that `make ui` reads.
    assert (tmp_path / "dagster_home" / "history" / "runs.db").exists()


def test_persistent_failure_exits_nonzero_naming_the_shard(tmp_path, sample_dir):
    proc = subprocess.run(
        [str(BIN / "etl-assets"), "run", "--data-dir", str(sample_dir), "--shards", "4",
         "--workers", "1"],
        # The retry waits are the policy's, from 0.1 s instead of 1 s: four attempts all the same.
        cwd=tmp_path, env=_env(tmp_path, CHAOS_FAIL_SHARD="1", CHAOS_FAIL_MODE="always",
                               SHARD_RETRY_DELAY_S="0.1"),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("FAILED: shard 1 failed after 4 attempt(s)")


def test_missing_source_file_fails_with_one_clear_line(tmp_path, sample_dir):
    (sample_dir / "billing.csv").unlink()
    proc = subprocess.run(
        [str(BIN / "etl-assets"), "run", "--data-dir", str(sample_dir), "--workers", "1"],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1] == f"FAILED: {sample_dir / 'billing.csv'}: file not found"


def test_dagster_cli_materializes_one_shard(tmp_path, sample_dir):
    env = _env(tmp_path, DATA_DIR=str(sample_dir))
    (tmp_path / "dagster_home").mkdir()
    base = [str(BIN / "dagster"), "asset", "materialize", "-m", "etl_assets.definitions"]
    for args in (["--select", "crm,billing,product,support"],
                 ["--select", "shard_profiles", "--partition", "3"]):
        proc = subprocess.run(base + args, cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    con = duckdb.connect(str(tmp_path / "var" / "warehouse.duckdb"), read_only=True)
    shards = con.execute("SELECT DISTINCT shard_id FROM shard_profiles").fetchall()
    count = con.execute("SELECT count(*) FROM shard_profiles").fetchone()[0]
    assert shards == [(3,)] and count > 50
    # A launched run executes its steps in its own process (defs/executor.py), not one
    # process per step: every event of the four sources' run came from one process.
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        [sources] = [r for r in instance.get_runs() if "dagster/partition" not in r.tags]
        events = instance.all_logs(sources.run_id)
    steps = {e.step_key for e in events if e.step_key}
    # (Events the instance records about the run itself carry no pid.)
    pids = {e.dagster_event.pid for e in events
            if e.dagster_event and e.dagster_event.pid is not None}
    assert steps == {"crm", "billing", "product", "support"} and len(pids) == 1, pids


def test_drill_prints_the_retry_timeline_and_passes(tmp_path, sample_dir):
    proc = subprocess.run(
        [str(BIN / "etl-assets"), "drill", "--shard", "2", "--shards", "4",
         "--data-dir", str(sample_dir)],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    start = out.index(next(ln for ln in out if ln.startswith("retry timeline of shard 2")))
    first, second = out[start + 2].split(), out[start + 3].split()
    assert first[0] == "1" and "failed, retrying (ChaosFailure: chaos: shard 2" in out[start + 2]
    assert second[0] == "2" and second[-1] == "success"
    assert 0.0 <= float(second[3]) <= 2.5  # 1 s base delay, +/- 1 s jitter, plus bookkeeping
    assert "PASS  export rows 1000 = distinct input customers 1000" in proc.stdout
    assert "PASS  duplicate customer_id in export: 0" in proc.stdout


def _console(body: str, **kwargs) -> subprocess.CompletedProcess:
    """`console_main` in a fresh interpreter, with `main` replaced by `body` (a statement list)."""
    code = ("import concurrent.futures, etl_assets.tools.cli as cli\n"
            "from etl_assets.tools.console import console_main\n"
            f"def main():\n    {body}\n"
            "cli.main = main\nconsole_main()\n")
    # Buffered output, as a user's shell gives it: what is left to flush at exit is the case.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=60, **kwargs)


def test_console_exit_waits_for_pools_and_runs_atexit_like_python():
    # A thread pool left open (and referenced): its workers are non-daemon and stop only once
    # Python's thread-shutdown hooks ran, so joining them first would hang forever.
    done = _console("import atexit; global pool; pool = concurrent.futures.ThreadPoolExecutor(1); "
                    "pool.submit(int); "
                    "atexit.register(print, 'atexit ran'); return 3",
                    capture_output=True, text=True)
    assert done.returncode == 3
    assert done.stdout == "atexit ran\n"


def test_console_registers_its_exit_before_any_other_module_can():
    """The console script leaves at the end of the exit handlers, so every other module's
    handler (logging's, filelock's, multiprocessing's, Dagster's) must be registered after its
    own: importing the entry point imports none of them."""
    code = ("import sys, etl_assets.tools.console\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('logging', 'filelock', "
            "'multiprocessing', 'dagster', 'duckdb', 'etl_assets')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "['etl_assets', 'etl_assets.tools', 'etl_assets.tools.console']"
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["scripts"]["etl-assets"] == "etl_assets.tools.console:console_main"


def test_console_exit_fails_when_its_output_cannot_be_written():
    # Python's own exit gives 120 when stdout cannot be flushed; a silent 0 would say the
    # command's output reached its file.
    with open("/dev/full", "w") as full:
        done = _console("print('profiles written'); return 0", stdout=full)
    assert done.returncode == 120
    ok = _console("print('profiles written'); return 0", capture_output=True, text=True)
    assert (ok.returncode, ok.stdout) == (0, "profiles written\n")
    # Started with no stdout at all (`>&-`): Python has none to flush, and neither do we.
    closed = _console("print('profiles written'); return 0", stderr=subprocess.PIPE,
                      preexec_fn=lambda: os.close(1))
    assert (closed.returncode, closed.stderr) == (0, b"")


BAD_ENVIRONMENT = {"SHARD_COUNT": "ten", "DUCKDB_THREADS": "-3", "MAX_REJECT_FRACTION": "nan",
                   "SHARD_RETRY_DELAY_S": "-1", "ETL_AUTOMATION": "x", "ETL_FORCE": "maybe",
                   "DUCKDB_MEMORY_LIMIT": "lots", "LOCK_TIMEOUT_S": "0"}


def test_help_and_generate_work_whatever_the_environment(tmp_path):
    """Issue 31, finding 4: settings were checked while the definitions were imported, so even
    `--help` and `generate` ended in a 19-line traceback (a fresh process: the imports count)."""
    env = _env(tmp_path, **BAD_ENVIRONMENT)
    etl = str(BIN / "etl-assets")
    helped = subprocess.run([etl, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "usage: etl-assets" in helped.stdout, helped.stderr
    made = subprocess.run([etl, "generate", "--rows", "20", "--out", str(tmp_path / "g")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "g" / "crm.csv").is_file()
    # Nor do `init` and `generate --pipeline`, which read a folder and a declaration only.
    declared = str(tmp_path / "g.yaml")
    for command in (["init", "--data-dir", str(tmp_path / "g"), "--key", "customer_id",
                     "--out", declared],
                    ["generate", "--pipeline", declared, "--rows", "20", "--out",
                     str(tmp_path / "h")]):
        done = subprocess.run([etl, *command], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "h" / "crm.csv").is_file()


@pytest.mark.parametrize("var", sorted(BAD_ENVIRONMENT))
def test_a_bad_environment_value_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, var):
    """Each command that reads the settings says `error: <VAR> ...` and exits 2, nothing run."""
    monkeypatch.setenv(var, BAD_ENVIRONMENT[var])
    monkeypatch.setenv("ETL_HOME", str(tmp_path / "var"))
    for command in (["run", "--data-dir", str(tmp_path)], ["drill"], ["home"]):
        assert cli.main(command) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"error: {var}") and err.count("\n") == 1, err
    assert not (tmp_path / "var").exists()  # nothing ran, nothing was created


@pytest.mark.parametrize("flags", [["--export", "{data}/crm.csv"], ["--export", "{tmp}/crm.csv"],
                                   ["--duckdb", "{data}/crm.csv"],
                                   ["--export", "{tmp}/var/warehouse.duckdb"]])
def test_an_export_or_warehouse_on_an_input_is_refused_and_nothing_changes(
        tmp_path, sample_dir, monkeypatch, capsys, flags):
    """Issue 31, finding 1: `--export data/crm.csv` replaced the input with the export, exit 0,
    and the next run ingested it as CRM data. Now: exit 2, one line naming both, nothing
    written (checked byte for byte, also through a symlink)."""
    (tmp_path / "crm.csv").symlink_to(sample_dir / "crm.csv")
    monkeypatch.setenv("ETL_HOME", str(tmp_path / "var"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    before = {p.name: p.read_bytes() for p in sample_dir.iterdir()}
    args = [f.format(data=sample_dir, tmp=tmp_path) for f in flags]
    assert cli.main(["run", "--data-dir", str(sample_dir), *args]) == 2
    out, err = capsys.readouterr()
    [line] = err.splitlines()
    assert out == "" and "would overwrite" in line, line
    assert {p.name: p.read_bytes() for p in sample_dir.iterdir()} == before
    assert not (tmp_path / "var").exists() and not (tmp_path / "dagster_home").exists()
