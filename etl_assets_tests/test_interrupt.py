"""Ctrl-C and SIGTERM during `etl-assets run`: one line, exit 130/143, nothing half-published.

A real `etl-assets run --workers 2` is signalled once it is in the shard phase: its stdout has a
`shard_start` line, and shard 3 keeps failing and waiting out its retry back-off
(CHAOS_FAIL_MODE=always), so the phase cannot end before the signal lands.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from etl_assets_tests.conftest import no_survivors, old_and_new_homes, shard_rows

BIN = Path(sys.executable).parent
SHARDS = 4

pytestmark = pytest.mark.kill


def _env(home: Path, data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SHARD_COUNT", "CHAOS_FAIL_SHARD", "CHAOS_FAIL_MODE", "EXPORT_PATH")}
    env.update(ETL_HOME=str(home), DAGSTER_HOME=str(home / "dagster_home"), DATA_DIR=str(data),
               **extra)
    return env


def _args() -> list[str]:
    return [str(BIN / "etl-assets"), "run", "--shards", str(SHARDS), "--workers", "2"]


def _run(home: Path, data: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_args(), env=_env(home, data), cwd=home, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A home that processed the old data, and what an undisturbed run makes of the new."""
    return old_and_new_homes(tmp_path_factory.mktemp("interrupt"), 2000, _run)


@pytest.mark.parametrize("signum, to_group, code", [
    (signal.SIGINT, True, 130),  # Ctrl-C in a terminal: the whole process group gets it
    (signal.SIGTERM, False, 143),  # `kill <pid>`, a supervisor stopping the service
])
def test_a_signal_in_the_shard_phase_stops_cleanly_then_a_rerun_heals(
    tmp_path, states, signum, to_group, code
):
    home = tmp_path / "home"
    shutil.copytree(states["old_home"], home)
    proc = subprocess.Popen(
        _args(), cwd=home, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=_env(home, states["new_data"], CHAOS_FAIL_SHARD="3", CHAOS_FAIL_MODE="always"),
        start_new_session=True,  # its own group: the signal reaches it and its children only
    )
    seen = []
    try:
        for line in proc.stdout:  # a shard_start line: the run is in the shard phase
            seen.append(line)
            if '"event": "shard_start"' in line:
                break
        assert seen and '"shard_start"' in seen[-1], "".join(seen)
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        signalled = time.monotonic()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped_in = time.monotonic() - signalled
    stdout = "".join(seen) + out
    assert proc.returncode == code, stdout + err
    assert stdout.strip().splitlines()[-1] == "INTERRUPTED during shards: nothing half-published"
    assert "Traceback" not in stdout + err
    assert stopped_in < 15, f"took {stopped_in:.1f}s to stop"  # it does not wait out retries
    # The workers died with it ...
    no_survivors(home, "shard workers of the interrupted run", timeout_s=10)
    # ... every shard holds its old or its new rows, and nothing was published.
    now = shard_rows(home)
    for shard in range(SHARDS):
        assert now.get(shard) in (states["old"][shard], states["new"][shard]), f"shard {shard}"
    assert now[3] == states["old"][3]  # the failing shard never committed
    assert (home / "merged_output.csv").read_bytes() == states["old_export"]
    # No Dagster run is left "in progress" in the UI.
    with dg.DagsterInstance.from_config(str(home / "dagster_home")) as instance:
        unfinished = instance.get_runs(dg.RunsFilter(statuses=[
            dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING,
            dg.DagsterRunStatus.NOT_STARTED]))
        assert unfinished == []
    healed = _run(home, states["new_data"])
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert (home / "merged_output.csv").read_bytes() == states["new_export"]
    assert shard_rows(home) == states["new"]
