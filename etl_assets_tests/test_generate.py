"""The generator: deterministic, realistic enough to exercise every rule, and the sample is its output."""

import csv
import dataclasses
import hashlib
from collections import Counter
from pathlib import Path

import duckdb
import pytest

from etl_assets.lib.declaration import SourceSchema
from etl_assets.lib.rules import install_rules
from etl_assets.lib.schema import SOURCES
from etl_assets.lib.validation import READ_CSV, read_csv_params, validation_sql
from etl_assets.tools import cli
from etl_assets.tools.generate import generate
from etl_assets.tools.generate_declared import generate_declared, load

REPO = Path(__file__).resolve().parent.parent


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.csv"))}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    generate(3000, seed=7, out_dir=tmp_path / "a")
    generate(3000, seed=7, out_dir=tmp_path / "b")
    generate(3000, seed=8, out_dir=tmp_path / "c")
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert set(_digests(tmp_path / "a").values()).isdisjoint(_digests(tmp_path / "c").values())


def test_shipped_sample_is_the_generators_output(tmp_path):
    generate(1000, seed=42, out_dir=tmp_path)
    assert _digests(tmp_path) == _digests(REPO / "data")


def test_files_follow_the_schema_and_cover_the_rules(tmp_path):
    generate(5000, seed=1, out_dir=tmp_path)
    rows = {}
    for name, schema in SOURCES.items():
        with open(tmp_path / schema.filename, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            assert reader.fieldnames == schema.column_names
            rows[name] = list(reader)
    ids = [r["customer_id"] for r in rows["crm"]]
    assert len(ids) == len(set(ids)) == 5000 and ids != sorted(ids)  # unique, unsorted
    assert all(i.startswith("cust_") and len(i) == 13 for i in ids)
    for name in ("billing", "product", "support"):
        assert 0.8 * 5000 < len(rows[name]) < 5000  # gaps between sources
        assert {r["customer_id"] for r in rows[name]} <= set(ids)
    payments = {r["payment_status"].strip().lower().replace("-", " ") for r in rows["billing"]}
    assert payments == {"active", "past due", "failed"}
    assert any(r["payment_status"] not in ("Active", "Past Due", "Failed") for r in rows["billing"])
    assert all((r["last_ticket_date"] == "") == (r["total_tickets"] == "0") for r in rows["support"])
    assert all(int(r["open_tickets"]) <= int(r["total_tickets"]) for r in rows["support"])
    usage = [float(r["usage_pct"]) for r in rows["product"] if r["usage_pct"]]
    assert min(usage) < 30 and max(usage) >= 80
    assert any("," in r["company_name"] for r in rows["crm"])
    assert any(not r["company_name"].isascii() for r in rows["crm"])


# --- generate --pipeline: synthetic data for any declaration ---------------------------------

# A domain that shares nothing with customers, with every constraint a generator must respect:
# two-sided ranges on each numeric kind, a required column, a category, and not_greater_than
# pairs over integers, over an integer and a decimal (a chain: late <= loans <= rating), and over
# dates.
LIBRARY = """\
key: book_id
sources:
  books:
    file: books.csv
    columns:
      book_id: {kind: id}
      title: {kind: text, required: true}
      genre: {kind: category, domain: [Crime, Poetry, Science, "yes"]}
      pages: {kind: int, min: 10, max: 2000}
      price: {kind: money, min: 0.01, max: 99.99}
      published: {kind: date}
  loans:
    file: loans.csv
    columns:
      book_id: {kind: id}
      late: {kind: int, min: 0}
      loans: {kind: int, min: 0, max: 50}
      rating: {kind: decimal, min: 1, max: 5.5}
      fee: {kind: decimal, min: -0.3, max: 0.29}
      first_loan: {kind: date}
      last_loan: {kind: date}
    not_greater_than: [[late, loans], [loans, rating], [first_loan, last_loan]]
derived:
  popular: loans > 25
"""


def validate_declared(path: Path, schema: SourceSchema, key: str) -> tuple[int, Counter]:
    """Rows read and reasons of the rejected ones, by the project's validation query.

    The query names the key customer_id (until `run --pipeline` makes it any key's), so the
    key column is read under that name; every other column is validated as declared.
    """
    as_customer = dataclasses.replace(schema, columns=tuple(
        dataclasses.replace(c, name="customer_id") if c.name == key else c
        for c in schema.columns))
    con = duckdb.connect()
    try:
        install_rules(con)
        con.execute(f"CREATE TEMP TABLE raw_rows AS SELECT * FROM {READ_CSV}",
                    read_csv_params(path, as_customer.column_names))
        assert con.execute("SELECT count(*) FROM csv_rejects").fetchone()[0] == 0
        con.execute(*validation_sql(con, as_customer))
        rows = con.execute("SELECT count(*) FROM checked").fetchone()[0]
        reasons = Counter(dict(con.execute("SELECT reason, count(*) FROM checked WHERE reason "
                                           "IS NOT NULL GROUP BY reason").fetchall()))
    finally:
        con.close()
    return rows, reasons


def _declared(tmp_path: Path, text: str = LIBRARY) -> Path:
    path = tmp_path / "library.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_generate_pipeline_writes_data_its_declaration_accepts(tmp_path):
    decl = load(_declared(tmp_path))
    assert cli.main(["generate", "--pipeline", str(tmp_path / "library.yaml"), "--rows", "3000",
                     "--seed", "5", "--out", str(tmp_path / "a")]) == 0
    keys: dict[str, list[str]] = {}
    for source in decl.sources:
        path = tmp_path / "a" / source.filename
        rows, reasons = validate_declared(path, source, decl.key)
        assert reasons == Counter() and rows > 2000, (source.name, reasons)
        with open(path, newline="", encoding="utf-8") as fh:
            records = list(csv.DictReader(fh))
        assert list(records[0]) == source.column_names
        keys[source.name] = [r["book_id"] for r in records]
        assert len(set(keys[source.name])) == len(records) == rows  # unique in each source
        for col in source.data_columns:  # required: never empty; otherwise: sometimes
            empty = sum(r[col.name] == "" for r in records)
            assert (empty == 0) if col.required else (0 < empty < rows * 0.1), col.name
    books, loans = (set(k) for k in keys.values())
    # Most keys in both sources, some in one only: the join meets matches and gaps.
    assert len(books & loans) > 0.7 * 3000 and books - loans and loans - books
    assert keys["books"] != sorted(keys["books"])  # files come unsorted
    with open(tmp_path / "a" / "books.csv", newline="", encoding="utf-8") as fh:
        books_rows = list(csv.DictReader(fh))
    assert {r["genre"] for r in books_rows} == {"Crime", "Poetry", "Science", "yes", ""}
    prices = [r["price"] for r in books_rows if r["price"]]
    assert all(len(p.split(".")[1]) == 2 for p in prices)  # money written with its cents
    with open(tmp_path / "a" / "loans.csv", newline="", encoding="utf-8") as fh:
        fees = [float(r["fee"]) for r in csv.DictReader(fh) if r["fee"]]
    assert min(fees) == -0.3 and max(fees) == 0.29  # both ends of the range are reached


def test_generate_pipeline_same_seed_same_bytes(tmp_path):
    decl = load(_declared(tmp_path))
    for folder, seed in (("a", 1), ("b", 1), ("c", 2)):
        generate_declared(decl, 400, seed=seed, out_dir=tmp_path / folder)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert set(_digests(tmp_path / "a").values()).isdisjoint(_digests(tmp_path / "c").values())
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["books.csv", "loans.csv"]


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("pages: {kind: int, min: 10, max: 2000}", "pages: {kind: int, min: 10.2, max: 10.8}",
     "sources.books.columns.pages: no int value to generate between min 10.2 and max 10.8"),
    ("late: {kind: int, min: 0}", "late: {kind: int, min: 51}",
     "sources.loans.not_greater_than: late <= loans cannot hold: the least late is above the "
     "largest loans"),
])
def test_generate_pipeline_refuses_what_no_value_can_satisfy(tmp_path, capsys, old, new,
                                                             problem):
    path = _declared(tmp_path, LIBRARY.replace(old, new))
    assert cli.main(["generate", "--pipeline", str(path), "--rows", "10",
                     "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {path}: {problem}\n"
    assert not list((tmp_path / "out").glob("*.csv"))


def test_generate_pipeline_with_a_bad_declaration_is_its_one_line(tmp_path, capsys):
    path = _declared(tmp_path, LIBRARY.replace("kind: money", "kind: moneyy"))
    assert cli.main(["generate", "--pipeline", str(path), "--rows", "10",
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:10: sources.books.columns.price.kind: unknown kind")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_generate_without_pipeline_is_the_customer_sample_through_the_cli(tmp_path):
    """`generate` without --pipeline is today's generator, byte for byte (the sample's)."""
    assert cli.main(["generate", "--rows", "1000", "--out", str(tmp_path)]) == 0
    assert _digests(tmp_path) == _digests(REPO / "data")
