"""Every failure of `etl-assets run` ends with one `FAILED: <one line>`, exit 1, no traceback.

One home gets a good run; each case then breaks one thing (a lock held by another process, a
Dagster home or ETL_HOME that is a file or read-only, a data directory that is a file, a source
path that is a directory, an export folder the user may not write) and checks the last line,
the exit code, the absence of a traceback and that the previous tables and export are untouched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from etl_assets_tests.conftest import REPO, SAMPLE, edit_crm, mounted, tmpfs

BIN = Path(sys.executable).parent
NOBODY = 65534

pytestmark = pytest.mark.cli


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SHARD_COUNT", "CHAOS_FAIL_SHARD", "CHAOS_FAIL_MODE", "EXPORT_PATH",
                        "DATA_DIR", "DUCKDB_PATH", "STAGING_DIR")}
    env.update({"ETL_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home"), **extra})
    return env


def _run(home: Path, data: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "etl-assets"), "run", "--shards", "4", "--workers", "1",
         "--data-dir", str(data), *args],
        env=_env(home, **extra), cwd=home if home.is_dir() else home.parent,
        capture_output=True, text=True, timeout=300)


def _state(home: Path) -> tuple[object, ...]:
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    try:
        tables = tuple(
            con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
            for table in ("customer_profiles", "profiles_manifest", "shard_profiles",
                          "source_manifest", "rejected_rows"))
    finally:
        con.close()
    return tables + ((home / "merged_output.csv").read_bytes(),)


def _assert_one_failed_line(proc: subprocess.CompletedProcess, expected: str) -> None:
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert last.startswith(f"FAILED: {expected}"), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("failures")
    data, home = root / "data", root / "home"
    shutil.copytree(SAMPLE, data)
    home.mkdir()
    proc = _run(home, data)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"root": root, "data": data, "home": home, "state": _state(home)}


def test_a_lock_held_by_another_process_is_one_line(good):
    """The CLI's own freshness check (outside any Dagster step) meets the lock."""
    home, warehouse = good["home"], good["home"] / "warehouse.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
         "print('ready', flush=True); time.sleep(120)", str(warehouse)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        proc = _run(home, good["data"], LOCK_TIMEOUT_S="1")
    finally:
        holder.kill()
        holder.wait()
    _assert_one_failed_line(proc, f"{warehouse}: still locked by process {holder.pid}")
    assert _state(home) == good["state"]


@pytest.mark.parametrize("case", ["dagster_home_file", "dagster_home_url_chars", "etl_home_file",
                                  "data_dir_file", "source_is_a_directory"])
def test_a_path_that_is_the_wrong_kind_is_one_line(good, tmp_path, case):
    home, data = good["home"], good["data"]
    extra: dict[str, str] = {}
    if case == "dagster_home_file":
        bad = tmp_path / "dagster_home"
        bad.write_text("a file\n")
        extra["DAGSTER_HOME"] = str(bad)
        expected = f"{bad}: is not a directory"
    elif case == "dagster_home_url_chars":
        bad = tmp_path / "dh?x"
        extra["DAGSTER_HOME"] = str(bad)
        expected = f"{bad}: DAGSTER_HOME cannot contain '?' or '%'"
    elif case == "etl_home_file":
        home = tmp_path / "etl_home"
        home.write_text("a file\n")
        expected = f"{home}: is not a directory"
    elif case == "data_dir_file":
        data = tmp_path / "data.csv"
        data.write_text("customer_id\n")
        expected = f"{data}: is not a directory"
    else:
        data = tmp_path / "data"
        shutil.copytree(good["data"], data)
        (data / "crm.csv").unlink()
        (data / "crm.csv").mkdir()
        expected = f"{data / 'crm.csv'}: is a directory"
    proc = _run(home, data, **extra)
    _assert_one_failed_line(proc, expected)
    if case == "etl_home_file":
        assert home.read_text() == "a file\n"
    elif case == "dagster_home_url_chars":  # nothing created at the path cut at "?"
        assert not (tmp_path / "dh").exists() and not (tmp_path / "dh?x").exists()
    else:
        assert _state(good["home"]) == good["state"]


def test_a_read_only_dagster_home_is_one_line(good, tmp_path):
    with tmpfs(tmp_path / "ro_home", "1m", "ro") as read_only:
        proc = _run(good["home"], good["data"], DAGSTER_HOME=str(read_only))
    _assert_one_failed_line(proc, f"{read_only}: read-only file system")
    assert _state(good["home"]) == good["state"]


def test_the_traceback_is_there_with_verbose(good, tmp_path):
    bad = tmp_path / "dagster_home"
    bad.write_text("a file\n")
    proc = _run(good["home"], good["data"], "-v", DAGSTER_HOME=str(bad))
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1] == f"FAILED: {bad}: is not a directory"
    assert "Traceback" in proc.stderr


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder outside pytest's private (0700) tmp tree, so another user can reach it."""
    path = Path(tempfile.mkdtemp(prefix="etl-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def public_checkout(shared_dir: Path) -> Iterator[Path]:
    """This checkout (with its .venv) where another user can reach it: a bind mount of it in
    a world-readable folder. The checkout may sit under a folder only its owner may enter (a
    `mktemp -d`, a 0700 home), which `nobody` cannot cross; a copy would be the whole 900 MB
    environment. Without `mount` (not root, no privilege) the test says so and fails under CI."""
    if not Path(sys.prefix).resolve().is_relative_to(REPO.resolve()):
        yield REPO  # an environment elsewhere: used where it is, as before
        return
    if not os.stat(REPO).st_mode & 0o005:
        pytest.skip(f"{REPO} itself is private to its owner (umask 077): another user cannot "
                    "read it through any path, and copying its environment costs 900 MB")
    with mounted(["--bind", str(REPO)], shared_dir / "checkout",
                 "bind-mount the checkout for another user") as view:
        yield view


def test_an_export_folder_without_write_permission_changes_nothing(shared_dir, public_checkout):
    """As an unprivileged user (root may write anywhere): `permission denied`, nothing changed."""
    data, home, locked = shared_dir / "data", shared_dir / "home", shared_dir / "locked"
    shutil.copytree(SAMPLE, data)
    home.mkdir()
    locked.mkdir()  # root's, 0755: nobody may not create the export's temp file here
    os.chown(home, NOBODY, NOBODY)
    export = locked / "out.csv"
    python = public_checkout / Path(sys.executable).relative_to(REPO) \
        if public_checkout != REPO else Path(sys.executable)

    def run_as_nobody(*args: str) -> subprocess.CompletedProcess:
        # setpriv starts the interpreter itself (a script's #! line names the private path);
        # PYTHONPATH puts the checkout's view ahead of the editable install's private path.
        return subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             str(python), "-m", "etl_assets.tools.cli", "run", "--shards", "4", "--workers", "1",
             "--data-dir", str(data), *args],
            env=_env(home, HOME=str(home), PYTHONPATH=str(public_checkout)), cwd=home,
            capture_output=True, text=True, timeout=300)

    first = run_as_nobody()
    assert first.returncode == 0, first.stdout + first.stderr
    before = _state(home)
    edit_crm(data, {"cust_00000007": 4321})
    proc = run_as_nobody("--export", str(export))
    _assert_one_failed_line(proc, f"{export}: permission denied")
    after = _state(home)
    assert after[:2] == before[:2] and after[-1] == before[-1]  # table, manifest, export
    assert list(locked.iterdir()) == []
    os.chown(locked, NOBODY, NOBODY)  # permission granted: the next run publishes
    healed = run_as_nobody("--export", str(export))
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert export.is_file()


def test_enospc_in_the_dagster_home_write_is_one_line(good):
    """The fault point in the CLI's own write of the Dagster home (ETL_CRASH_MODE=enospc)."""
    home = good["home"]
    proc = _run(home, good["data"], ETL_CRASH_AT="dagster_home_write", ETL_CRASH_MODE="enospc")
    _assert_one_failed_line(proc, f"{home / 'dagster_home'}: no space left on device")
    assert _state(home) == good["state"]


def test_a_real_full_dagster_home_is_one_line_then_heals(good, tmp_path):
    """Dagster's SQLite storage on a 600 KB tmpfs: SQLite says "disk I/O error" or "database or
    disk is full"; the user reads which folder is full."""
    data = tmp_path / "data"
    shutil.copytree(good["data"], data)
    home = tmp_path / "home"
    home.mkdir()
    with tmpfs(tmp_path / "small_dagster_home", "600k") as small:
        proc = _run(home, data, DAGSTER_HOME=str(small))
        _assert_one_failed_line(proc, f"{small}: no space left on device")
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        healed = _run(home, data, DAGSTER_HOME=str(small))
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert (home / "merged_output.csv").read_bytes() == \
        (good["home"] / "merged_output.csv").read_bytes()
