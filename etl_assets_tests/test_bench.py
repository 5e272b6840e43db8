"""The benchmark: a small smoke of it (it measures, and writes the table, the JSON and the
chart), and its floors and edits on another declaration than the customers'."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from etl_assets.lib import pipeline
from etl_assets.lib.declaration import Declaration
from etl_assets.lib.rules import DECLARATION, install_rules
from etl_assets.lib.validation import read_source
from etl_assets.tools import bench_floors
from etl_assets.tools.bench import (
    FULL_FLOOR_LABEL,
    PHASE_FLOOR_LABEL,
    REFRESHES,
    _measure,
    fixed_cost_label,
    fresh_label,
)
from etl_assets.tools.bench_edits import (
    EditError,
    append_keys,
    change_one_row,
    change_scattered,
    edit_target,
)
from etl_assets.tools.generate import generate
from etl_assets.tools.generate_declared import generate_declared
from etl_assets_tests.test_other_domain import FLEET

BIN = Path(sys.executable).parent


@pytest.mark.cli
def test_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [str(BIN / "etl-assets"), "bench", "--rows", "2000", "--shards", "2", "--workers", "2",
         "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    labels = [r["label"] for r in report["results"]]
    assert labels == ["floor: one DuckDB query", FULL_FLOOR_LABEL, PHASE_FLOOR_LABEL,
                      "etl-assets run --shards 2 --workers 2", "unchanged re-run (skips)",
                      "one row changed re-run",
                      *[label for refresh, _ in REFRESHES for label in (refresh, fresh_label(refresh))],
                      fixed_cost_label(2, 2)]
    for r in report["results"]:
        assert r["wall_s"] > 0 and r["peak_rss_mb"] > 50 and r["rows_per_s"] > 0
    floors = report["results"][2]["phases"]
    assert set(floors) == {"sources_s", "shards_s", "profiles_s", "outside_runs_s"}, floors
    assert all(floors[k] > 0 for k in ("sources_s", "shards_s", "profiles_s")), floors
    first = report["results"][3]
    assert first["slowest_shard_ms"] and first["shard_compute_s"] is not None
    for r in report["results"][3:]:
        # Each phase comes from the Dagster runs of that command only: with runs of an earlier
        # command counted, the spans would outgrow the wall time and leave outside_runs_s < 0.
        phases = r["phases"]
        # An unchanged re-run launches no sources or shard run, only customer_profiles.
        assert set(phases) == {"sources_s", "shards_s", "profiles_s", "outside_runs_s"} or (
            r["label"] == "unchanged re-run (skips)"
            and set(phases) == {"profiles_s", "outside_runs_s"}), phases
        assert all(v > 0 for v in phases.values()), phases
    # Each refresh beside the first run on the same files (whose export it matched), the second
    # one on 2,000 + 0.5% customers.
    for refresh, fresh in zip(report["results"][6:10:2], report["results"][7:11:2], strict=True):
        assert refresh["extra"]["fresh_first_run_s"] == fresh["wall_s"]
        assert refresh["extra"]["of_first_run"] == round(refresh["wall_s"] / fresh["wall_s"], 3)
    appended = report["results"][8]
    assert appended["rows_per_s"] == pytest.approx(2010 / appended["wall_s"], rel=0.01)
    assert report["machine"]["cores"] >= 1 and report["machine"]["floor_s"] > 0
    table = (out / "bench.md").read_text()
    assert table.count("\n| ") == 12 + 3 and "× floor" in table and "outside runs s" in table
    refreshes = table.split("Each refresh beside a first run")[1].splitlines()
    row = next(line for line in refreshes if line.startswith("| 0.5% new customers"))
    assert row.endswith(f" | {appended['extra']['of_first_run']:.1%} |"), row
    # Each run's phase beside that phase's own floor, as a multiple of it.
    row = next(line for line in table.splitlines()
               if line.startswith("| etl-assets run --shards 2 --workers 2 |"))
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


def test_refresh_edits(tmp_path):
    """The refreshes' edits: 1% of billing's mrr values changed at scattered positions, the same
    for the same seed; 0.5% new customers with the same new ids in all four files."""
    data = tmp_path / "data"
    generate(2000, 42, data)
    before = {n: (data / f"{n}.csv").read_bytes().splitlines()
              for n in ("crm", "billing", "product", "support")}
    assert change_scattered(data, 2000) == 0
    after = (data / "billing.csv").read_bytes().splitlines()
    changed = [i for i, (a, b) in enumerate(zip(before["billing"], after, strict=True)) if a != b]
    assert len(changed) == round((len(after) - 1) * 0.01)
    assert changed[0] < len(after) // 4 and changed[-1] > 3 * len(after) // 4  # scattered
    for i in changed:
        old, new = before["billing"][i].split(b","), after[i].split(b",")
        assert old[:3] + old[4:] == new[:3] + new[4:]
        assert float(new[3]) == pytest.approx(float(old[3]) + 1)
    again = tmp_path / "again"
    generate(2000, 42, again)
    change_scattered(again, 2000)
    assert (again / "billing.csv").read_bytes() == (data / "billing.csv").read_bytes()

    assert append_keys(data, 2000) == 10
    new_ids = [b"cust_%08d" % i for i in range(2001, 2011)]
    for name, lines in before.items():
        now = (data / f"{name}.csv").read_bytes().splitlines()
        assert now[:len(lines)] == (lines if name != "billing" else after)
        assert [line.split(b",")[0] for line in now[len(lines):]] == new_ids
        assert not {line.split(b",")[0] for line in lines} & set(new_ids)


def test_the_shipped_bench_still_changes_billing_mrr():
    """Any declaration's bench edits one column; the shipped one's stays billing's mrr, under
    the labels every earlier bench used, so their figures stay comparable."""
    source, column = edit_target(DECLARATION)
    assert (source.name, column.name) == ("billing", "mrr")
    assert [label for label, _ in REFRESHES] == [
        "1% of billing rows changed, scattered, re-run",
        "0.5% new customers in every source, re-run"]


def _fleet(tmp_path: Path, text: str = FLEET) -> tuple[Declaration, Path]:
    path = tmp_path / "fleet.yaml"
    path.write_text(text, encoding="utf-8")
    decl = pipeline.declaration(str(path))
    data = tmp_path / "data"
    generate_declared(decl, ROWS, out_dir=data)
    return decl, data


ROWS = 1000


def test_floors_of_another_declaration(tmp_path):
    """Each floor of the fleet runs and gives one row per key; the phase floors' merge (the
    pipeline's query) and the full-width floor's agree on every column."""
    decl, data = _fleet(tmp_path)
    keys = set()
    for source in decl.sources:
        with open(data / source.filename, newline="", encoding="utf-8") as fh:
            keys |= {r["vehicle_id"] for r in csv.DictReader(fh)}
    con = duckdb.connect()
    assert bench_floors.plain_floor(con, decl, data) == len(keys)
    plain = con.execute("SELECT * FROM profiles")
    assert [c[0] for c in plain.description] == ["vehicle_id", "km_per_trip", "mileage"]
    assert {r[0] for r in plain.fetchall()} == keys
    assert bench_floors.full_floor(con, decl, data, tmp_path / "full.csv") == len(keys)
    full = con.execute("SELECT * FROM profiles").fetchall()
    assert [r[0] for r in full] == sorted(keys)
    assert len((tmp_path / "full.csv").read_bytes().splitlines()) == len(keys) + 1
    times = bench_floors.phase_floors(duckdb.connect(str(tmp_path / "p.duckdb")), decl, data,
                                      tmp_path / "staged", tmp_path / "p.csv", 3)
    assert set(times) == {"sources_s", "shards_s", "profiles_s"}
    with duckdb.connect(str(tmp_path / "p.duckdb")) as phases:
        merged = phases.execute("SELECT * EXCLUDE (shard_id, idempotency_key) FROM profiles "
                                "ORDER BY vehicle_id").fetchall()
    assert merged == full


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_edits_of_another_declaration(tmp_path):
    """The edits on a fleet with a quoted text column before the changed one and the key not
    first: exactly the expected records of that one column change, within its range, and the
    files stay valid; the append adds the same new keys to every source."""
    # trips as wide as vehicles: the first narrowest source is then vehicles, whose price comes
    # after the quoted `make` (`"Kraków Systems, Inc."`).
    decl, data = _fleet(tmp_path, FLEET.replace("      last_trip:", "      driver: {kind: text}\n"
                                                "      last_trip:"))
    source, column = edit_target(decl)
    assert (source.name, column.name) == ("vehicles", "price")
    path = data / "vehicles.csv"
    table = _rows(path)
    order = ["make", "price", "vehicle_id", "fuel", "bought"]
    with open(path, "w", newline="", encoding="utf-8") as fh:  # the key not first
        writer = csv.DictWriter(fh, order, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    assert b'"' in path.read_bytes()

    def changed(before: list[dict[str, str]], after: list[dict[str, str]]) -> list[int]:
        assert len(before) == len(after)
        for b, a in zip(before, after, strict=True):
            assert {k: v for k, v in b.items() if k != "price"} == \
                {k: v for k, v in a.items() if k != "price"}
            if a["price"] != b["price"]:
                assert float(a["price"]) >= 0 and len(a["price"].split(".")[1]) == 2
                assert not b["price"] or float(a["price"]) == pytest.approx(float(b["price"]) + 1)
        return [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if a != b]

    assert change_scattered(data, ROWS, decl=decl) == 0
    scattered = _rows(path)
    assert len(changed(table, scattered)) == round(len(table) * 0.01)
    change_one_row(data, decl)
    assert changed(scattered, _rows(path)) == [0]
    before = {s.name: _rows(data / s.filename) for s in decl.sources}
    assert append_keys(data, ROWS, decl=decl) == 5
    new = [f"vehicle_{i:08d}" for i in range(ROWS + 1, ROWS + 6)]
    for s in decl.sources:
        rows = _rows(data / s.filename)
        assert rows[:len(before[s.name])] == before[s.name]
        assert [r["vehicle_id"] for r in rows[len(before[s.name]):]] == new
        with duckdb.connect() as con:  # the engine's own validation of the source
            install_rules(con, decl)
            report = read_source(con, data / s.filename, s)
        assert report.rejected == 0 and report.rows_read == len(rows), (s.name, report.reasons)
    # A record that goes on past its line is refused in one line, not edited in half.
    rows = _rows(path)
    rows[0]["make"] = "Multi\nline"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, order, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    kept = path.read_bytes()
    with pytest.raises(EditError, match="vehicles.csv: a quoted field holds a line break"):
        change_one_row(data, decl)
    assert path.read_bytes() == kept
