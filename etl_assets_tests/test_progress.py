"""Live progress: a run says what it is doing while it does it (plain timestamped lines when its
output is not a terminal)."""

import io
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from etl_assets.tools.generate import generate
from etl_assets.tools.progress import PHASES, Progress

BIN = Path(sys.executable).parent
LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\w+): (.*)$")


def _lines(text: str) -> list[tuple[datetime, str, str]]:
    parsed = []
    for line in text.splitlines():
        match = LINE.match(line)
        assert match, f"not a progress line: {line!r}"
        stamp = datetime.fromisoformat(match.group(1).replace("Z", "+00:00"))
        parsed.append((stamp, match.group(2), match.group(3)))
    return parsed


@pytest.mark.cli
def test_a_run_names_each_phase_in_order_with_timestamps(tmp_path):
    data = tmp_path / "data"
    generate(3000, seed=7, out_dir=data)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SHARD_COUNT", "CHAOS_", "DATA_DIR", "EXPORT_PATH"))}
    env.update(DAGSTER_HOME=str(tmp_path / "dagster_home"), ETL_HOME=str(tmp_path / "var"))
    proc = subprocess.run(
        [str(BIN / "etl-assets"), "run", "--data-dir", str(data), "--shards", "3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = _lines(proc.stderr)  # every stderr line is a progress line: no bar, no colour codes
    stamps = [stamp for stamp, _, _ in lines]
    assert stamps == sorted(stamps)
    phases = list(dict.fromkeys(phase for _, phase, _ in lines))
    assert phases == list(PHASES), phases
    said = [f"{phase}: {text}" for _, phase, text in lines]
    # Rows staged per source, with the figures the source's check reports on stdout.
    for source in ("crm", "billing", "product", "support"):
        staged = [s for s in said if s.startswith(f"sources: {source}: ") and "rows staged" in s]
        assert len(staged) == 1, said
        accepted = re.search(r"accepted=(\d+)", next(
            ln for ln in proc.stdout.splitlines() if ln.startswith(f"check {source}.rows_")))
        assert f" {int(accepted.group(1)):,} rows staged" in staged[0]
    # Shards done of total, each shard once.
    built = [s for s in said if s.startswith("shards: shard ")]
    assert [line[-8:] for line in built] == [f"[{i} of 3]" for i in (1, 2, 3)], built
    # The publish's own steps, then the checks waiting for the export written beside them.
    publish = [s for s in said if s.startswith("customer_profiles: ") and "still" not in s]
    assert publish[1:] == [
        "customer_profiles: snapshot: writing 3 of 3 shards",
        "customer_profiles: export: writing the sorted part of each changed shard",
        "customer_profiles: table: replacing 3 of 3 shards, while the export is merged from "
        "3 parts"], publish
    assert "checks: waiting for the export's merge" in said
    assert said[-1] == "done: every step and check passed"

    # The unchanged re-run still names every phase, and says what it skipped.
    again = subprocess.run(
        [str(BIN / "etl-assets"), "run", "--data-dir", str(data), "--shards", "3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    lines = _lines(again.stderr)
    assert list(dict.fromkeys(phase for _, phase, _ in lines)) == list(PHASES)
    said = [text for _, _, text in lines]
    assert "0 of 4 sources to stage, the others unchanged" in said
    assert "0 of 3 shards to build, the others unchanged" in said


def test_a_quiet_stretch_gets_a_still_line():
    out = io.StringIO()
    progress = Progress(stream=out, live=False, heartbeat_s=0.3)
    with progress.running():
        progress.start_phase("shards", "2 of 10 shards to build")
        progress.expect(2, "2 of 10 shards to build")
        time.sleep(1.0)
        progress.step("shard 4 built", advance=1)
    lines = _lines(out.getvalue())
    still = [text for _, _, text in lines if text.startswith("still ")]
    assert still and all("0 of 2 done" in text for text in still), lines
    assert lines[-1][2] == "shard 4 built [1 of 2]"
    # And with nothing to show, nothing is written.
    Progress(silent=True).start_phase("sources", "x")
