"""`etl-assets init`: a declaration inferred from a folder of CSV files, that the project's own
loader accepts, that `generate --pipeline` can use, and whose kinds accept every value of the
files it came from; and the README's init, edit, run on one folder. Real files, real DuckDB,
a real Dagster instance."""

from __future__ import annotations

from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import duckdb
import pytest
import yaml

from etl_assets.lib import declaration_file
from etl_assets.lib.rules import DECLARATION, ENGINE_MACROS, install_rules
from etl_assets.lib.validation import read_source
from etl_assets.tools import cli
from etl_assets.tools.generate import generate
from etl_assets.tools.generate_declared import generate_declared
from etl_assets.tools.runner import run_pipeline
from etl_assets_tests.conftest import make_settings, read_export, write_csv
from etl_assets_tests.test_generate import validate_declared
from etl_assets_tests.test_other_domain import VEHICLES as VEHICLE_COUNT
from etl_assets_tests.test_other_domain import write_fleet

VEHICLES = (["vehicle_id", "make", "capacity_kg", "bought", "depot", "code", "tare"], [
    ["v01", "Volvo", "12000", "2019-03-01", "North", "007", "7.50"],
    ["v02", "Scania", "18000", "2020-07-15", "South", "012", "8.00"],
    ["v03", "Volvo", "9000", "2018-11-30", "North", "113", "6.25"],
    ["v04", "MAN", "26000", "2021-01-04", "East", "020", "11.10"],
    ["v05", " scania ", "15000", "2022-05-20", "", "031", "9.99"],
    ["v06", "Volvo", "11000", "2017-09-09", "North", "044", "7.00"],
    ["v07", "MAN", "", "2023-02-11", "South", "050", ""],
    ["v08", "VOLVO", "13500", "2020-12-01", "East", "061", "8.40"],
])
TRIPS = (["vehicle_id", "km", "driver", "depot", "started"], [
    ["v01", "120.5", "Ana Silva", "", "03/01/2026"],
    ["v02", "88.25", "Ben Okafor", "", "04/01/2026"],
    ["v03", "301.75", "Carla Rossi", "", "05/01/2026"],
    ["v04", "45", "Dmitri Novak", "", "06/01/2026"],
    ["v05", "612.3", "Jensen, Elif", "", "07/01/2026"],
    ["v09", "19.9", "Farah Khan", "", "08/01/2026"],
])


def _fleet(folder: Path) -> Path:
    write_csv(folder / "vehicles.csv", *VEHICLES)
    write_csv(folder / "trips.csv", *TRIPS)
    return folder


def _init(capsys, data: Path, out: Path, *flags: str, key: str = "vehicle_id") -> tuple[int, str,
                                                                                       str]:
    code = cli.main(["init", "--data-dir", str(data), "--key", key, "--out", str(out), *flags])
    out_text, err = capsys.readouterr()
    return code, out_text, err


def _load(path: Path):
    return declaration_file.load(path, ENGINE_MACROS)


def test_init_infers_a_fleet_folder_the_loader_accepts(tmp_path, capsys):
    data = _fleet(tmp_path / "fleet")
    out = tmp_path / "fleet.yaml"
    code, printed, err = _init(capsys, data, out)
    assert (code, err) == (0, "")
    assert printed.splitlines()[0] == "trips (trips.csv, 6 rows): vehicle_id id, km decimal, " \
                                      "driver text, depot category (3 values), started text"
    decl = _load(out)
    assert decl.key == "vehicle_id" and [s.name for s in decl.sources] == ["trips", "vehicles"]
    kinds = {s.name: {c.name: (c.kind, c.domain) for c in s.columns} for s in decl.sources}
    assert kinds == {
        # 07/03/2026 is not a date the pipeline reads: text. depot is empty here: it takes
        # the kind vehicles.csv gives it (one kind per shared column).
        "trips": {"vehicle_id": ("id", ()), "km": ("decimal", ()), "driver": ("text", ()),
                  "depot": ("category", ("East", "North", "South")),
                  "started": ("text", ())},
        # Spellings etl_norm reads alike are one value, spelled as most rows spell it;
        # 007 is a code (text); values all written with two decimals are money.
        "vehicles": {"vehicle_id": ("id", ()), "make": ("category", ("MAN", "Scania", "Volvo")),
                     "capacity_kg": ("int", ()), "bought": ("date", ()),
                     "depot": ("category", ("East", "North", "South")),
                     "code": ("text", ()), "tare": ("money", ())},
    }
    assert all(c.min is None and c.max is None and not c.required
               for s in decl.sources for c in s.columns)  # ranges open, nothing required
    assert (decl.prefer, decl.macros, decl.derived) == ((("depot", ("trips", "vehicles")),), (), ())
    text = out.read_text(encoding="utf-8")
    top = yaml.safe_load(text)
    assert top["derived"] == {} and top["prefer"] == {} and list(top) == [
        "key", "sources", "prefer", "macros", "derived"]
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert len(comments) >= 10 and "# Carried by several: depot (trips, vehicles)." in comments
    # Every value of the files it came from is valid as declared (the kinds are not guesses
    # the pipeline would then reject).
    for source in decl.sources:
        rows, reasons = validate_declared(data / source.filename, source, decl.key)
        assert reasons == Counter() and rows > 5, (source.name, reasons)
    # The same folder elsewhere gives the same bytes; an existing file needs --force.
    copy = _fleet(tmp_path / "elsewhere" / "fleet")
    assert _init(capsys, copy, out)[0] == 2
    assert _init(capsys, copy, out, "--force")[0] == 0
    assert out.read_text(encoding="utf-8") == text
    # Re-loaded, it generates data its own validation accepts.
    generate_declared(decl, 300, seed=3, out_dir=tmp_path / "generated")
    for source in decl.sources:
        rows, reasons = validate_declared(tmp_path / "generated" / source.filename, source,
                                          decl.key)
        assert reasons == Counter() and rows > 200, (source.name, reasons)


def test_init_on_customer_data_agrees_with_customers_yaml(tmp_path, capsys):
    generate(1000, seed=1, out_dir=tmp_path / "data")
    out = tmp_path / "customers.yaml"
    assert _init(capsys, tmp_path / "data", out, key="customer_id")[0] == 0
    inferred = {s.name: s for s in _load(out).sources}
    assert sorted(inferred) == sorted(s.name for s in DECLARATION.sources)
    for shipped in DECLARATION.sources:
        got = {c.name: c for c in inferred[shipped.name].columns}
        assert list(got) == shipped.column_names  # the files' columns, in order
        for col in shipped.columns:
            kind = got[col.name].kind
            if col.kind in ("id", "int", "date", "category", "decimal"):
                assert kind == col.kind, (shipped.name, col.name, kind)
            else:  # money is written like any decimal (12.5); a text with few values: category
                assert kind in {"money": ("money", "decimal"), "text": ("text", "category")}[
                    col.kind], (shipped.name, col.name, kind)
            if col.kind == "category":  # variant spellings (PAST-DUE) fold into the declared
                assert got[col.name].domain == tuple(sorted(col.domain)), col.name
    # Every row of the files is valid as inferred (the pipeline's own read_source).
    con = duckdb.connect()
    try:
        install_rules(con)
        for source in inferred.values():
            report = read_source(con, tmp_path / "data" / source.filename, source)
            assert report.rejected == 0 and report.accepted > 800, (source.name, report.reasons)
    finally:
        con.close()


def test_the_values_decide_past_the_sniffers_sample(tmp_path, capsys):
    """DuckDB's sniffer reads the first 20,480 rows: a value past them that does not fit its
    type (a decimal among integers, a code with a leading zero, an impossible date) decides."""
    rows = [[f"k{i}", str(i), str(i + 1), str(date(2020, 1, 1) + timedelta(days=i % 900))]
            for i in range(20_500)]
    rows[-1][1:] = ["3.5", "007", "2026-02-30"]
    write_csv(tmp_path / "data" / "big.csv", ["id", "n", "code", "day"], rows)
    assert _init(capsys, tmp_path / "data", tmp_path / "big.yaml", key="id")[0] == 0
    [source] = _load(tmp_path / "big.yaml").sources
    assert [(c.name, c.kind) for c in source.columns] == [
        ("id", "id"), ("n", "decimal"), ("code", "text"), ("day", "text")]


def test_category_values_read_back_exactly(tmp_path, capsys):
    """Values YAML would read as something else (yes, null, a number, a mapping) are quoted."""
    odd = ["yes", "No", "null", "#1", "a: b", "[x]", "Ünïcode", "- dash", "it's", '"q"', "~"]
    write_csv(tmp_path / "data" / "answers.csv", ["id", "answer"],
              [[f"k{i}", v] for i, v in enumerate(odd * 3)])
    out = tmp_path / "answers.yaml"
    assert _init(capsys, tmp_path / "data", out, key="id")[0] == 0
    [source] = _load(out).sources
    assert source.columns[1].domain == tuple(sorted(odd))


def test_a_file_name_that_is_no_source_name_and_a_semicolon_file(tmp_path, capsys):
    write_csv(tmp_path / "a" / "2024.csv", ["id", "x"], [["k1", "1"]])
    code, _, err = _init(capsys, tmp_path / "a", tmp_path / "o.yaml", key="id")
    assert code == 2 and err == (f"error: {tmp_path / 'a' / '2024.csv'}: the file name gives no "
                                 "source name (letters, digits and _, not starting with a digit); "
                                 "rename the file\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "fleet-trips.csv").write_text("id;km\nk1;2\nk2;3\n", encoding="utf-8")
    code, _, err = _init(capsys, tmp_path / "b", tmp_path / "o.yaml", key="id")
    assert code == 2 and err == (f"error: {tmp_path / 'b' / 'fleet-trips.csv'}: its fields are "
                                 "separated by ';'; the pipeline reads comma-separated files\n")
    assert not (tmp_path / "o.yaml").exists()


@pytest.mark.parametrize(("case", "problem"), [
    ("missing key", "{data}/vehicles.csv: no key column 'vehicle_id' (header: id, make); every "
                    "file carries the key"),
    ("existing out", "{out}: exists; --force replaces it"),
    ("unreadable", "{data}/vehicles.csv: DuckDB cannot read it as CSV: It was not possible to "
                   "automatically detect the CSV parsing dialect"),
    ("empty folder", "{data}: no *.csv file to declare (one source per CSV file)"),
    ("no rows", "{data}/vehicles.csv: has a header but no data rows: nothing to infer kinds from"),
    ("bad column", "{data}/vehicles.csv: column 'fuel type' cannot be declared (letters, digits "
                   "and _, not starting with a digit); rename it in the header"),
    ("keyword", "{out}:27: sources.vehicles.columns.select: 'select' is an SQL keyword; choose "
                "another name (as inferred from {data}: rename that file or column; nothing "
                "written)"),
])
def test_each_error_is_one_line_and_writes_nothing(tmp_path, capsys, case, problem):
    data, out = tmp_path / "fleet", tmp_path / "fleet.yaml"
    write_csv(data / "trips.csv", *TRIPS)
    vehicles = data / "vehicles.csv"
    if case == "missing key":
        write_csv(vehicles, ["id", "make"], [["v1", "MAN"]])
    elif case == "existing out":
        out.write_text("mine\n", encoding="utf-8")
    elif case == "unreadable":
        vehicles.write_bytes(b'vehicle_id,make\nv1,"MAN\nv2,Volvo\n')
    elif case == "empty folder":
        (data / "trips.csv").unlink()
    elif case == "no rows":
        vehicles.write_text("vehicle_id,make\n", encoding="utf-8")
    else:
        name = "fuel type" if case == "bad column" else "select"
        write_csv(vehicles, ["vehicle_id", name], [["v1", "x"]])
    code, printed, err = _init(capsys, data, out)
    assert (code, printed) == (2, "")
    assert err == "error: " + problem.format(data=data, out=out) + "\n"
    assert out.read_text(encoding="utf-8") == "mine\n" if case == "existing out" \
        else not out.exists()


def test_init_edit_run_on_the_same_folder(tmp_path, capsys, instance):
    """The README's three steps on one folder: init, a derived column added, run (in-process,
    a real Dagster instance): every vehicle exported, the bad row quarantined."""
    data = tmp_path / "fleet"
    write_fleet(data)
    out = tmp_path / "fleet.yaml"
    assert _init(capsys, data, out)[0] == 0
    text = out.read_text(encoding="utf-8")
    assert text.count("derived: {}") == 1
    out.write_text(text.replace("derived: {}", "derived:\n  long_haul: km >= 2000"),
                   encoding="utf-8")
    settings = make_settings(tmp_path, data, pipeline=str(out), shard_count=3)
    outcome = run_pipeline(settings, echo=lambda line: None, instance=instance)
    assert outcome.ok, outcome.reason
    rows = {row["vehicle_id"]: row for row in read_export(Path(settings.export_path))}
    assert len(rows) == VEHICLE_COUNT and rows["V0200"]["long_haul"] == "true"
    assert rows["V0007"]["km"] == "91.5" and rows["V0007"]["long_haul"] == "false"
    with duckdb.connect(settings.database, read_only=True) as con:
        assert con.execute("SELECT source, reason FROM rejected_rows").fetchall() == [
            ("services", "missing_vehicle_id")]
