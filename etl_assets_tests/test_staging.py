"""Staging by shard: the slice hashes written with the files agree with the sensor's plan."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl_assets.lib import staging
from etl_assets.lib.events import progress_listener
from etl_assets.lib.schema import SOURCES
from etl_assets.lib.sources import plan_slices, stage_source
from etl_assets_tests.conftest import examples, make_settings, write_csv


@pytest.mark.parametrize("shards", [4, 10])
def test_staged_hashes_match_the_plan_for_every_source(tmp_path: Path, sample_dir: Path, shards):
    settings = make_settings(tmp_path, sample_dir, shard_count=shards)
    for name, schema in SOURCES.items():
        result = stage_source(schema, settings)
        sha, planned = plan_slices(schema, settings)
        assert sha == result.staged.file_sha256
        # The sensor decides which shards a changed file touches by comparing these.
        assert planned == result.staged.slice_hashes, name
        assert sum(result.staged.slice_rows.values()) == result.report.accepted
        for k in range(shards):
            rows = duckdb.connect().execute("SELECT count(*) FROM read_parquet(?)",
                                            [result.staged.slice_files(k)]).fetchone()[0]
            assert rows == result.staged.slice_rows[k]


def test_empty_shards_get_a_readable_empty_slice_with_the_plans_hash(tmp_path: Path):
    data = tmp_path / "data"
    schema = SOURCES["support"]
    write_csv(data / schema.filename, schema.column_names,
              [["cust_1", "a@x.example", 3, 1, 2.5, "2025-01-01", 9, 4.5]])
    settings = make_settings(tmp_path, data, shard_count=8)
    result = stage_source(schema, settings)
    _, planned = plan_slices(schema, settings)
    assert planned == result.staged.slice_hashes
    assert sorted(result.staged.slice_rows.values()) == [0] * 7 + [1]
    empty = [k for k, n in result.staged.slice_rows.items() if n == 0]
    assert len({result.staged.slice_hashes[k] for k in empty}) == 1
    for k in empty:
        con = duckdb.connect()
        rel = con.read_parquet(result.staged.slice_files(k))
        assert rel.fetchall() == [] and "row_hash" in rel.columns
    assert staging.read_pointer(settings.staging_dir, "support").slice_rows == result.staged.slice_rows


def test_a_source_with_no_valid_row_stages_empty_slices_for_every_shard(tmp_path: Path):
    data = tmp_path / "data"
    schema = SOURCES["support"]
    write_csv(data / schema.filename, schema.column_names,
              [["cust_1", "a@x.example", 3, 1, 2.5, "2025-01-01", 42, 4.5],  # nps out of range
               ["cust_2", "b@x.example", "many", 1, 2.5, "2025-01-01", 9, 4.5]])
    settings = make_settings(tmp_path, data, shard_count=3, max_reject_fraction=1.0)
    result = stage_source(schema, settings)
    assert result.report.rejected == 2 and result.staged.slice_rows == {0: 0, 1: 0, 2: 0}
    assert plan_slices(schema, settings)[1] == result.staged.slice_hashes
    for k in range(3):
        assert duckdb.connect().read_parquet(result.staged.slice_files(k)).fetchall() == []


def test_staging_read_from_another_mount_point_finds_its_own_files(tmp_path: Path,
                                                                  sample_dir: Path):
    """Shared staging mounted elsewhere on another machine: a reader there resolves every
    version under its own STAGING_DIR, never at the path the stager's machine recorded."""
    settings = make_settings(tmp_path, sample_dir, shard_count=3)
    stage_source(SOURCES["crm"], settings)
    elsewhere = tmp_path / "mounted-elsewhere"
    shutil.move(settings.staging_dir, elsewhere)  # the stager's path no longer exists
    staged = staging.read_pointer(str(elsewhere), "crm")
    assert Path(staged.version_dir).parent == elsewhere / "crm"
    files = [f for k in range(3) for f in staged.slice_files(k)]
    assert files and all(f.startswith(str(elsewhere)) for f in files)


def _small_billing(tmp_path: Path) -> tuple[Path, bytes]:
    """A clean 20-record billing.csv in tmp_path/data: (data folder, its bytes)."""
    data = tmp_path / "data"
    data.mkdir()
    text = "\n".join([",".join(SOURCES["billing"].column_names),
                      *(_billing_line(f"cust_{i:02d}") for i in range(20))]) + "\n"
    (data / SOURCES["billing"].filename).write_text(text, encoding="utf-8")
    return data, text.encode()


def _age(folder: Path) -> None:
    """Make every temp folder, lock file and temp file in `folder` two minutes old (by mtime)."""
    then = time.time() - 120
    for path in [*folder.glob(".tmp-*"), *folder.glob(".*.tmp")]:
        os.utime(path, (then, then))


def test_a_runs_own_temp_folders_outlive_its_publish_however_old(tmp_path: Path):
    """Staging one source can take minutes: the run's snapshot folder, still in use after the
    publish (its file becomes the version's source.csv), is not pruned by that publish."""
    data, text = _small_billing(tmp_path)
    settings = make_settings(tmp_path, data, shard_count=3)
    folder = Path(settings.staging_dir) / "billing"
    aged = []

    def hook(point: str) -> None:
        if point == "source_before_publish":
            aged.extend(p.name for p in folder.glob(".tmp-*") if p.is_dir())
            _age(folder)
    result = stage_source(SOURCES["billing"], settings, hook)
    assert len(aged) == 2, aged  # the snapshot's and the slices' folders
    assert (Path(result.staged.version_dir) / staging.RAW).read_bytes() == text
    assert list(folder.glob(".tmp-*")) == []  # each removed by its writer at its end


# Another process (a concurrent run, or one on another machine) writing into a temp folder
# for as long as its stdin stays open.
_WRITER = """import sys
from pathlib import Path
from etl_assets.lib import files
with files.temp_dir(Path(sys.argv[1])) as path:
    (path / "part.parquet").write_bytes(b"partial")
    print(path, flush=True)
    sys.stdin.read()
"""


def test_only_temp_folders_of_dead_writers_are_pruned_however_old(tmp_path: Path):
    """A publish removes a temp folder whose writer is gone (killed: its lock is free) or, with
    no lock file (older code's), one that is old; a live writer's stays, however old. A
    pointer's temp file (written in microseconds) goes once old: a crash left it."""
    data, _ = _small_billing(tmp_path)
    settings = make_settings(tmp_path, data, shard_count=3)
    folder = Path(settings.staging_dir) / "billing"
    live, dead = (subprocess.Popen([sys.executable, "-c", _WRITER, str(folder)], text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                  for _ in range(2))
    try:
        live_dir, dead_dir = (Path(p.stdout.readline().strip()) for p in (live, dead))
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        (folder / ".tmp-older-code").mkdir()
        crashed = folder / f".{staging.POINTER}.{'a' * 32}.tmp"
        crashed.write_text("{}", encoding="utf-8")
        _age(folder)
        (folder / ".tmp-older-code-young").mkdir()
        writing = folder / f".{staging.POINTER}.{'b' * 32}.tmp"
        writing.write_text("{}", encoding="utf-8")
        assert (dead_dir / "part.parquet").is_file()
        stage_source(SOURCES["billing"], settings)
        assert sorted(p.name for p in folder.glob(".tmp-*")) == sorted(
            [live_dir.name, f"{live_dir.name}.lock", ".tmp-older-code-young"])
        assert (live_dir / "part.parquet").read_bytes() == b"partial"
        assert not crashed.exists() and writing.exists()
    finally:
        live.communicate("")
    assert live.returncode == 0
    assert not live_dir.exists()  # removed by its writer, with its lock file
    assert sorted(p.name for p in folder.glob(".tmp-*")) == [".tmp-older-code-young"]


def _billing_line(customer_id: str, mrr: str = "12.50", plan: str = "Starter") -> str:
    return f"{customer_id},{customer_id}@x.example,{plan},{mrr},Active,2024-01-01,2025-01-01"


def _change(lines: list[str], index: int, mrr: str) -> None:
    fields = lines[index].split(",")
    fields[3] = mrr
    lines[index] = ",".join(fields)


# Edits of a clean billing.csv (lines[0] is the header), each staged from the changed records
# alone, and edits that need the whole file (the change is refused, or not one stretch).
EDITS = {
    "value_changed": lambda lines: _change(lines, 40, "777.77"),
    "record_added": lambda lines: lines.insert(60, _billing_line("cust_new_1")),
    "record_removed": lambda lines: lines.pop(70),
    "first_record_changed": lambda lines: _change(lines, 1, "1.00"),
    "last_record_removed": lambda lines: lines.pop(),
    "record_added_at_the_end": lambda lines: lines.append(_billing_line("cust_new_2")),
    "quoted_value": lambda lines: lines.insert(20, _billing_line("cust_new_3", plan='"Starter"')),
    "two_neighbours_changed": lambda lines: (_change(lines, 30, "5.00"), _change(lines, 31, "6.00")),
    "empty_line_added": lambda lines: lines.insert(80, ""),
}
WHOLE_FILE = {
    "id_of_another_record": lambda lines: lines.insert(50, _billing_line(lines[9].split(",")[0])),
    "invalid_value": lambda lines: _change(lines, 45, "lots"),
    "changes_far_apart": lambda lines: (_change(lines, 5, "5.00"), _change(lines, 290, "6.00")),
    "header_changed": lambda lines: lines.__setitem__(0, lines[0].replace("plan", "plan ")),
    # No record changed, only an empty line (which the reader skips) was added at the end.
    "empty_line_at_the_end": lambda lines: lines.append(""),
    # The new stretch is empty and the old one most of the file.
    "cut_to_ten_records": lambda lines: lines.__delitem__(slice(11, None)),
}


@pytest.mark.parametrize("edit", sorted(EDITS) + sorted(WHOLE_FILE))
def test_an_edited_source_is_staged_as_the_whole_file_would_be(tmp_path: Path, edit):
    """An edit of a clean file is staged from its current version and the changed records
    alone when they are one stretch that validates clean; either way the slices hold exactly
    the rows, hashes and counts that staging the whole file gives, and the report is the
    same."""
    from etl_assets.tools.generate import generate

    schema = SOURCES["billing"]
    data = tmp_path / "data"
    generate(300, seed=5, out_dir=data)
    settings = make_settings(tmp_path / "home", data, shard_count=4)
    first = stage_source(schema, settings)
    assert first.report.rejected == 0
    assert (Path(first.staged.version_dir) / staging.RAW).is_file()

    path = data / schema.filename
    lines = path.read_text(encoding="utf-8").splitlines()
    {**EDITS, **WHOLE_FILE}[edit](lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = stage_source(schema, settings)
    # Staged from the changed records: the untouched shards' slices are the current
    # version's own files (hard links), and at least one shard got a new one.
    linked = {k for k in range(4) if {Path(f).stat().st_ino for f in first.staged.slice_files(k)}
              == {Path(f).stat().st_ino for f in result.staged.slice_files(k)}}
    assert (0 < len(linked) < 4) is (edit in EDITS), linked

    whole = stage_source(schema, make_settings(tmp_path / "fresh", data, shard_count=4))
    assert result.report == whole.report
    assert (result.staged.slice_hashes, result.staged.slice_rows) == \
        (whole.staged.slice_hashes, whole.staged.slice_rows)
    con = duckdb.connect()

    def rows(staged: staging.StagedSource, k: int) -> list[tuple]:
        return con.execute("SELECT * FROM read_parquet(?) ORDER BY customer_id",
                           [staged.slice_files(k)]).fetchall()
    for k in range(4):
        assert rows(result.staged, k) == rows(whole.staged, k)
    # The file is kept with the current version only (the next edit is diffed against it).
    kept = sorted(p.parent.name for p in (Path(settings.staging_dir) / "billing").glob(
        f"*/{staging.RAW}"))
    assert kept == ([Path(result.staged.version_dir).name] if whole.report.rejected == 0 else [])


def test_a_stretch_is_bounded_in_both_files(tmp_path: Path):
    """Cutting a file to a few records leaves a short new stretch and a long old one: neither
    may exceed the fraction, or the old one would be read into memory whole."""
    from etl_assets.lib.file_diff import changed_region
    from etl_assets.lib.files import file_sha256

    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    lines = ["customer_id,mrr"] + [f"cust_{i:05d},{i}.00" for i in range(1000)]
    old.write_text("\n".join(lines) + "\n")
    header = len(lines[0]) + 1
    new.write_text("\n".join(lines[:11]) + "\n")
    assert changed_region(old, file_sha256(old), new, header, 0.05) is None
    new.write_text("\n".join(lines[:500] + lines[510:]) + "\n")
    region = changed_region(old, file_sha256(old), new, header, 0.05)
    # The stretch runs to the first line break after the change: ten records out, none in.
    assert region is not None
    stretch = {name: path.read_bytes()[region.start:end].decode().splitlines()
               for name, path, end in (("old", old, region.old_end), ("new", new, region.new_end))}
    assert stretch == {"old": lines[500:511], "new": lines[510:511]}


def test_an_undone_edit_is_staged_from_the_changed_records_too(tmp_path: Path):
    """Editing a value back: the file is a version staged before, whose folder is kept; it is
    staged from the changed record again (not read whole), in that version's place."""
    from etl_assets.tools.generate import generate

    schema = SOURCES["billing"]
    data = tmp_path / "data"
    generate(300, seed=5, out_dir=data)
    settings = make_settings(tmp_path / "home", data, shard_count=4)
    path = data / schema.filename
    original = path.read_bytes()
    first = stage_source(schema, settings)
    lines = original.decode().splitlines()
    _change(lines, 40, "777.77")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    edited = stage_source(schema, settings)
    path.write_bytes(original)
    stages: list[str] = []
    with progress_listener(lambda stage, fields: stages.append(stage)):
        undone = stage_source(schema, settings)
    assert "source_changed" in stages, stages
    assert undone.staged.version_dir == first.staged.version_dir
    assert (undone.staged.slice_hashes, undone.staged.slice_rows) == \
        (first.staged.slice_hashes, first.staged.slice_rows)
    # Staged from the edit's version: its untouched shards' files are hard links of those.
    linked = [k for k in range(4) if {Path(f).stat().st_ino for f in edited.staged.slice_files(k)}
              == {Path(f).stat().st_ino for f in undone.staged.slice_files(k)}]
    assert 0 < len(linked) < 4, linked
    assert (Path(undone.staged.version_dir) / staging.RAW).read_bytes() == original


def _crm_line(customer_id: str, email: str = "", company: str = "Acme Inc.") -> str:
    """A clean crm record; `company` as written in the file (quoted or not)."""
    return (f"{customer_id},{email or customer_id + '@x.example'},{company},Energy,12,Lead,"
            "100.00,Alice Wong,2025-01-01\n")


def _staged_rows(staged: staging.StagedSource) -> list[list[tuple]]:
    """Every shard's rows, sorted."""
    con = duckdb.connect()
    return [con.execute("SELECT * FROM read_parquet(?) ORDER BY ALL",
                        [staged.slice_files(k)]).fetchall() for k in range(staged.shard_count)]


def test_a_stray_quote_does_not_make_a_line_inside_a_quoted_value_a_record(tmp_path: Path):
    """Issue 31, finding 2: the reader keeps a lone quote inside an unquoted value as text, so
    after one (o"neil@…) an even count of quotes no longer says "outside quotes". A line
    inside a later multi-line quoted value then looked like a record boundary: replacing the
    blank line inside it with record-looking text staged a phantom customer and kept the real
    customer's old company name. The re-run must stage what the whole file gives."""
    schema = SOURCES["crm"]
    data = tmp_path / "data"
    data.mkdir()
    lines = [",".join(schema.column_names) + "\n"] + [
        _crm_line(f"cust_{i:08d}") for i in range(40)]
    lines[3] = _crm_line("cust_00000002", email='o"neil@example.com')
    lines[31] = _crm_line("cust_00000030", company='"Acme\n\nHoldings"')
    path = data / schema.filename
    path.write_text("".join(lines), encoding="utf-8")
    settings = make_settings(tmp_path / "home", data, shard_count=4)
    first = stage_source(schema, settings)
    assert first.report.rejected == 0  # clean: its file is kept for the next edit's diff
    assert 'o"neil@example.com' in {r[1] for rows in _staged_rows(first.staged) for r in rows}

    phantom = _crm_line("cust_99999999", company="Phantom Corp").rstrip("\n")
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('"Acme\n\nHoldings"', f'"Acme\n{phantom}\nHoldings"'),
                    encoding="utf-8")
    result = stage_source(schema, settings)
    whole = stage_source(schema, make_settings(tmp_path / "fresh", data, shard_count=4))
    staged = {r[0]: r for rows in _staged_rows(result.staged) for r in rows}
    assert "cust_99999999" not in staged
    assert staged["cust_00000030"][2] == f"Acme\n{phantom}\nHoldings"
    assert result.report == whole.report
    assert _staged_rows(result.staged) == _staged_rows(whole.staged)
    assert (result.staged.slice_hashes, result.staged.slice_rows) == \
        (whole.staged.slice_hashes, whole.staged.slice_rows)


# Fields of generated crm records as written in the file, quotes and all: quoted values with
# commas, doubled quotes and line breaks, some with a blank line inside ("{n}" is the file's
# line end), and emails with a lone quote inside an unquoted value (the reader keeps it as text).
# The first choice of each list below makes the simplest example, which Hypothesis tries first,
# issue 31's case: a stray quote, then the blank line of a quoted value turned into a record.
EMAILS = ["{id}@x.example", '"{id}@x.example"']
STRAY_EMAILS = ['o"neil.{id}@x.example', '{id}"@x.example']
COMPANIES = ['"Acme{n}{n}Holdings"', "Acme Inc.", '"Acme, Inc."', '"The ""Best"" Co"',
             '"Acme{n}Holdings"', '"Tyrell{n}{n}{n}Corp, Ltd"', '"{n}"']


@st.composite
def crm_file(draw: st.DrawFn) -> tuple[bytes, list[list[bytes] | None]]:
    """(line end, items): a crm record's fields, or None for an empty line. Two files in
    three have one email with a stray quote, among the first records (every line break after
    it then has an odd count of quotes before it outside quoted values, an even one inside)."""
    n = draw(st.sampled_from([b"\n", b"\r\n"]))
    size = draw(st.integers(2, 16))
    stray = draw(st.sampled_from([*STRAY_EMAILS, None]))
    stray_at = draw(st.integers(0, 2))
    items: list[list[bytes] | None] = []
    for i in range(size):
        email = stray if stray and i == stray_at else draw(st.sampled_from(EMAILS))
        items.append(_crm_fields(f"cust_{i:04d}", email, draw(st.sampled_from(COMPANIES)), n,
                                 draw(st.integers(0, 99))))
        if draw(st.integers(0, 5)) == 0:
            items.append(None)
    return n, items


def _crm_fields(customer_id: str, email: str, company: str, n: bytes, count: int) -> list[bytes]:
    """A record's fields as written; "{id}" in the email is the id, "{n}" the line end."""
    values = [customer_id, email.format(id=customer_id), company, "Energy", str(count), "Lead",
              "100.00", "Alice Wong", "2025-01-01"]
    return [v.encode().replace(b"{n}", n) for v in values]


def _crm_bytes(n: bytes, items: list[list[bytes] | None], ends: dict[int, bytes],
               last_end: bool) -> bytes:
    """The file: header, plain filler records (so that an edit of a few records is a small
    enough stretch for the shortcut) and the items, each line ended by `n` (an item by its
    entry in `ends`, if any), the last one only if `last_end`."""
    head = [",".join(SOURCES["crm"].column_names).encode()] + [
        b",".join(_crm_fields(f"cust_f{i:03d}", "{id}@x.example", "Acme Inc.", n, i))
        for i in range(60)]
    lines = [(line, n) for line in head] + [
        (b"" if item is None else b",".join(item), ends.get(i, n)) for i, item in enumerate(items)]
    return b"".join(line + end for line, end in lines[:-1]) + lines[-1][0] + \
        (lines[-1][1] if last_end else b"")


# Edits, drawn as (kind, where, ...). The blank line inside a quoted value replaced by a
# record's text (a new id, or another record's), written raw (the value's quoting is whatever
# the bytes now say), is drawn most often, and mostly as the text that looks most like a clean
# record: a new id, no quote.
EDIT_KINDS = ["blank_line_to_record"] * 4 + \
    ["value", "insert", "delete", "empty_line", "stray_quote", "line_end"]
EDIT = st.tuples(
    st.sampled_from(EDIT_KINDS), st.integers(0, 10**6), st.integers(0, 99),
    st.sampled_from(["Phantom Corp"] * 3 + COMPANIES), st.sampled_from([False] * 3 + [True]),
    st.sampled_from([b"\r", b"\r\n", b"\n"]))


def _edit(n: bytes, items: list[list[bytes] | None], ends: dict[int, bytes], edit: tuple,
          fresh: str) -> None:
    """Apply one edit in place; `fresh` is an id no record has."""
    kind, at, number, company, other_id, line_end = edit
    records = [i for i, item in enumerate(items) if item is not None]
    record = records[at % len(records)] if records else None
    if kind == "value" and records:
        items[record][4] = str(number).encode()
    elif kind == "insert":
        items.insert(at % (len(items) + 1), _crm_fields(fresh, "{id}@x.example", company, n, 7))
    elif kind == "delete" and len(records) > 1:
        del items[record]
    elif kind == "empty_line":
        items.insert(at % (len(items) + 1), None)
    elif kind == "stray_quote" and records:
        field = 1 + number % 2  # the email or the company
        items[record][field] = items[record][field][:2] + b'"' + items[record][field][2:]
    elif kind == "line_end":
        ends[at % len(items)] = line_end  # never the header's: it sets the file's line end
    elif kind == "blank_line_to_record":
        blank = [i for i in records if n + n in items[i][2]]
        if blank:
            i = blank[at % len(blank)]
            text = b",".join(_crm_fields(items[records[0]][0].decode() if other_id else fresh,
                                         "{id}@x.example", company, n, 3))
            items[i][2] = items[i][2].replace(n + n, n + text + n, 1)


def _stage_outcome(schema, settings_) -> tuple:
    """What staging gives: the report and every shard's rows and hashes, or the error."""
    try:
        result = stage_source(schema, settings_)
    except Exception as exc:  # the whole file's error, which the shortcut must give too
        return type(exc).__name__, str(exc)
    staged = result.staged
    return result.report, _staged_rows(staged), staged.slice_hashes, staged.slice_rows


@settings(max_examples=examples(20), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file=crm_file(), edits=st.lists(EDIT, min_size=1, max_size=2), last_end=st.booleans())
def test_every_edit_is_staged_as_the_whole_edited_file_would_be(tmp_path_factory, file, edits,
                                                                last_end):
    """Whatever the quotes (stray ones in unquoted values, quoted values over several lines,
    blank lines inside them), the line ends (LF, CRLF, a bare CR or a mix) and empty lines: a
    re-run after each edit stages exactly what staging the edited file from scratch (forced,
    in a home of its own) gives, or fails with the same error."""
    base = tmp_path_factory.mktemp("edits")
    schema = SOURCES["crm"]
    data = base / "data"
    data.mkdir()
    path = data / schema.filename
    n, items = file
    ends: dict[int, bytes] = {}
    path.write_bytes(_crm_bytes(n, items, ends, last_end))
    rerun = make_settings(base / "home", data, shard_count=3, max_reject_fraction=1.0)
    whole = make_settings(base / "whole", data, shard_count=3, max_reject_fraction=1.0,
                          force=True)
    stage_source(schema, rerun)
    for step, edit in enumerate(edits):
        _edit(n, items, ends, edit, f"cust_new_{step}")
        path.write_bytes(_crm_bytes(n, items, ends, last_end))
        assert _stage_outcome(schema, rerun) == _stage_outcome(schema, whole), \
            (edit, path.read_bytes())
    shutil.rmtree(base)
