"""A small smoke of the benchmark: it measures, and writes the table, the JSON and the chart."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from etl_assets.tools.bench import (
    FULL_FLOOR_LABEL,
    PHASE_FLOOR_LABEL,
    _measure,
    fixed_cost_label,
)

BIN = Path(sys.executable).parent


@pytest.mark.cli
def test_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [str(BIN / "etl-assets"), "bench", "--rows", "2000", "--shards", "2", "--workers", "1,2",
         "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    labels = [r["label"] for r in report["results"]]
    assert labels == ["floor: one DuckDB query", FULL_FLOOR_LABEL, PHASE_FLOOR_LABEL,
                      "etl-assets run --shards 2 --workers 1",
                      "etl-assets run --shards 2 --workers 2", "unchanged re-run (skips)",
                      "one row changed re-run", fixed_cost_label(2, 2)]
    for r in report["results"]:
        assert r["wall_s"] > 0 and r["peak_rss_mb"] > 50 and r["rows_per_s"] > 0
    floors = report["results"][2]["phases"]
    assert set(floors) == {"sources_s", "shards_s", "profiles_s", "outside_runs_s"}, floors
    assert all(floors[k] > 0 for k in ("sources_s", "shards_s", "profiles_s")), floors
    runs = report["results"][3:5]
    assert all(r["slowest_shard_ms"] and r["shard_compute_s"] is not None for r in runs)
    for r in report["results"][3:]:
        # Each phase comes from the Dagster runs of that command only: with runs of an earlier
        # command counted, the spans would outgrow the wall time and leave outside_runs_s < 0.
        phases = r["phases"]
        # An unchanged re-run launches no sources or shard run, only customer_profiles.
        assert set(phases) == {"sources_s", "shards_s", "profiles_s", "outside_runs_s"} or (
            r["label"] == "unchanged re-run (skips)"
            and set(phases) == {"profiles_s", "outside_runs_s"}), phases
        assert all(v > 0 for v in phases.values()), phases
    assert report["machine"]["cores"] >= 1 and report["machine"]["floor_s"] > 0
    table = (out / "bench.md").read_text()
    assert table.count("\n| ") == 9 and "× floor" in table and "outside runs s" in table
    # Each run's phase beside that phase's own floor, as a multiple of it.
    row = next(line for line in table.splitlines()
               if line.startswith("| etl-assets run --shards 2 --workers 1 |"))
    expected = report["results"][3]["phases"]["sources_s"] / floors["sources_s"]
    assert row.split(" | ")[7].endswith(f"({expected:.1f}×)"), row
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not (out / "work").exists()  # generated data and warehouses are cleaned up


def test_peak_rss_is_the_commands_own_not_the_parents(tmp_path):
    """A large parent must not show up in a small command's peak RSS (Linux carries peak RSS
    over fork + exec; the bench measures through a small launcher for that reason)."""
    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page so it is resident
    wall, rss_mb, out = _measure([sys.executable, "-c", "print('small')"], {}, tmp_path)
    assert out.strip() == "small" and wall > 0
    assert 5 < rss_mb < 200, rss_mb
    _, big, _ = _measure([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = "
                          "b'x' * len(b[::4096]); print(len(b))"], {}, tmp_path)
    assert big > 300  # and a command's own growth is measured
    del ballast
