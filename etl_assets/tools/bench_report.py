"""The bench's report: bench.md (the table, the refreshes), bench.json and bench.png."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FULL_FLOOR_LABEL = "full-width floor: one query, all columns, sorted table + CSV export"
PHASE_FLOOR_LABEL = "phase floors: one DuckDB query per phase's work"


@dataclass
class Measurement:
    """One measured command."""

    label: str
    shards: int | None
    workers: int | None
    wall_s: float
    peak_rss_mb: float
    rows_per_s: float
    slowest_shard_ms: int | None = None
    shard_compute_s: float | None = None
    other_s: float | None = None
    phases: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def write_reports(results: list[Measurement], rows: int, out_dir: Path,
                  noun: str = "customers", profiles: str = "customer_profiles") -> None:
    """bench.md, bench.json and (with matplotlib) bench.png in `out_dir`; `noun` counts the
    keys (`customers` for the shipped pipeline), `profiles` names its merged table."""
    floor = results[0].wall_s
    meta = {"rows": rows, "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "python": platform.python_version(), "floor_s": floor}
    (out_dir / "bench.json").write_text(json.dumps(
        {"machine": meta, "results": [asdict(r) for r in results]}, indent=1), encoding="utf-8")
    lines = [f"{rows:,} {noun}, {meta['cores']} cores, {meta['memory_gb']} GB, {meta['date']}",
             "", "| configuration | wall s | × floor | rows/s | peak RSS MB | slowest shard ms "
             f"| shard compute s | sources s | shards s | {profiles} + checks s "
             "| outside runs s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    phase_floor = next((r.phases for r in results if r.label == PHASE_FLOOR_LABEL), {})
    for r in results:
        phases = [_beside_floor(r, k, phase_floor) for k in ("sources_s", "shards_s",
                                                             "profiles_s")]
        phases.append(r.phases.get("outside_runs_s", ""))
        lines.append(f"| {r.label} | {r.wall_s} | {r.wall_s / floor:.1f} | {r.rows_per_s:,} | "
                     f"{r.peak_rss_mb} | {r.slowest_shard_ms or ''} | {r.shard_compute_s or ''} | "
                     + " | ".join(str(p) for p in phases) + " |")
    lines += ["", f"sources / shards / {profiles} + checks: from the first start to the last "
              "end of that job's Dagster runs, and in brackets that time as a multiple of the "
              "phase's own floor (the phase floors row: one DuckDB query doing that phase's "
              "work: read each CSV and write it split by shard as Parquet; join and score every "
              "shard into one table; sort it, export the CSV and count rows, ids and keys); "
              "outside runs: process start, imports and the time between runs."]
    refreshes = [r for r in results if "of_first_run" in r.extra]
    if refreshes:
        lines += ["", "Each refresh beside a first run in a fresh home on the same files:", "",
                  "| refresh | refresh s | first run s | refresh / first run |",
                  "|---|---|---|---|"]
        lines += [f"| {r.label} | {r.wall_s} | {r.extra['fresh_first_run_s']} | "
                  f"{r.extra['of_first_run']:.1%} |" for r in refreshes]
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        _chart(results, out_dir / "bench.png", profiles)
    except ModuleNotFoundError as exc:  # the chart is optional: pip install 'etl_assets[bench]'
        print(f"no chart: {exc.name} is not installed (pip install 'etl_assets[bench]')")


def _beside_floor(r: Measurement, key: str, floor: dict) -> str:
    """A run's phase time with its multiple of that phase's floor, e.g. `11.6 (3.1×)`."""
    value = r.phases.get(key)
    if value is None:
        return ""
    if r.label == PHASE_FLOOR_LABEL or not floor.get(key):
        return str(value)
    return f"{value} ({value / floor[key]:.1f}×)"


def _chart(results: list[Measurement], path: Path, profiles: str) -> None:
    """One bar per measured row, split into its phases (sources, shards, profiles + checks,
    outside runs), the phase floors' bar first; the floors as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [("sources_s", "sources"), ("shards_s", "shards"),
              ("profiles_s", f"{profiles} + checks"), ("outside_runs_s", "outside runs")]
    rows = [r for r in results if r.phases][::-1]  # top to bottom in the table's order
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.55 * len(rows)), dpi=100)
    labels = [r.label.replace(" --shards", "\n--shards") if len(r.label) > 45 else r.label
              for r in rows]
    left = [0.0] * len(rows)
    for (key, name), colour in zip(phases, ("tab:blue", "tab:orange", "tab:green", "tab:grey"),
                                   strict=True):
        widths = [float(r.phases.get(key) or 0) for r in rows]
        ax.barh(labels, widths, left=left, color=colour, label=name)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.axvline(results[0].wall_s, color="black", linestyle="--", label="floor (one query)")
    full = [r for r in results if r.label == FULL_FLOOR_LABEL]
    if full:
        ax.axvline(full[0].wall_s, color="black", linestyle=":",
                   label="full-width floor (all columns + CSV export)")
    ax.set_xlabel("wall time (s)")
    ax.set_title("etl-assets run by phase, beside the floors")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
