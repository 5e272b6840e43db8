"""The generator: deterministic, realistic enough to exercise every rule, and the sample is its output."""

import csv
import hashlib
from pathlib import Path

from etl_assets.lib.schema import SOURCES
from etl_assets.tools.generate import generate

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
