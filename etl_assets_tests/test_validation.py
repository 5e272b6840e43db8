"""Reading source files: file-level errors are one clear line; bad rows are quarantined."""

import json

import duckdb
import pytest

from etl_assets import warehouse
from etl_assets.schema import SOURCES
from etl_assets.sources import stage_source
from etl_assets.validation import SourceFileError, read_source
from etl_assets_tests.conftest import make_settings, write_csv

SUPPORT = SOURCES["support"]
CRM = SOURCES["crm"]


def _read(path, schema):
    con = duckdb.connect()
    from etl_assets.rules import install_rules

    install_rules(con)
    report = read_source(con, path, schema)
    accepted = con.execute("SELECT * FROM accepted ORDER BY customer_id").fetchall()
    rejected = con.execute(
        "SELECT line_number, customer_id, reason, raw FROM rejected ORDER BY line_number"
    ).fetchall()
    return report, accepted, rejected


def test_bad_rows_are_quarantined_with_reasons_and_line_numbers(tmp_path):
    rows = [
        ["s1", "a@x", 3, 1, 2.5, "2025-01-02", 9, 4.5],  # good
        ["", "b@x", 1, 0, 1, "2025-01-02", 5, 3],  # missing id
        ["s3", "c@x", "three", 0, 1, "2025-01-02", 5, 3],  # not an integer
        ["s4", "d@x", 2, 0, 1, "2025-02-30", 5, 3],  # date that does not exist
        ["s5", "e@x", 2, 0, 1, "2025-01-02", 11, 3],  # nps out of range
        ["s6", "f@x", 2, 3, 1, "2025-01-02", 5, 3],  # open > total
        ["s7", "g@x", 2, 0, "-1", "2025-01-02", 5, 3],  # negative hours
        ["s8", "h@x", 2, 0, 1, "2025-01-02", 5, 5.1],  # csat out of range
        ["s9", "", "", "", "", "", "", ""],  # all empty but the id: valid, all nulls
        ["s1", "a2@x", 4, 1, 2.5, "2025-01-03", 10, 4.5],  # duplicate: last wins
    ]
    path = write_csv(tmp_path / "support.csv", SUPPORT.column_names, rows)
    report, accepted, rejected = _read(path, SUPPORT)
    assert (report.rows_read, report.accepted, report.rejected) == (10, 2, 8)
    assert [(r[0], r[2]) for r in rejected] == [
        (2, "duplicate_customer_id"),
        (3, "missing_customer_id"),
        (4, "invalid_integer(total_tickets)"),
        (5, "invalid_date(last_ticket_date)"),
        (6, "out_of_range(nps_score)"),
        (7, "open_tickets_exceeds_total_tickets"),
        (8, "out_of_range(avg_resolution_hrs)"),
        (9, "out_of_range(csat_score)"),
    ]
    assert json.loads(rejected[2][3])["total_tickets"] == "three"  # raw: the row as read
    s1 = next(r for r in accepted if r[0] == "s1")
    assert s1[1] == "a2@x" and s1[2] == 4  # the later duplicate won
    s9 = next(r for r in accepted if r[0] == "s9")
    assert all(v is None for v in s9[1:8])  # empty values are nulls, not errors


def test_categoricals_checked_after_normalization(tmp_path):
    header = SOURCES["billing"].column_names
    rows = [
        ["b1", "", "starter", 10, "PAST DUE", "", ""],
        ["b2", "", " Business ", 10, "past-due", "", ""],
        ["b3", "", "Starter", 10, "overdue", "", ""],
        ["b4", "", "gold", 10, "Active", "", ""],
    ]
    report, accepted, rejected = _read(write_csv(tmp_path / "b.csv", header, rows), SOURCES["billing"])
    assert [(r[0], r[2], r[4]) for r in accepted] == [
        ("b1", "Starter", "Past Due"), ("b2", "Business", "Past Due")]
    assert [r[2] for r in rejected] == ["invalid_category(payment_status)", "invalid_category(plan)"]


def test_quoting_bom_crlf_newlines_and_unicode_survive(tmp_path):
    path = tmp_path / "crm.csv"
    body = (
        "customer_id,email,company_name,industry,employee_count,deal_stage,deal_value,"
        "sales_owner,last_contact,notes\r\n"
        'c1,a@x,"Müller, ""Söhne"" & Co.\nZweigstelle",Retail,5,Lead,10.5,Zoë,2025-01-01,x\r\n'
        "c2,b@x,Ōkami,,,,,,,\r\n"
        "c3,c@x,Plain,,bad,,,,,\r\n"
    )
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    report, accepted, rejected = _read(path, CRM)
    assert report.extra_columns == ["notes"]
    assert accepted[0][2] == 'Müller, "Söhne" & Co.\nZweigstelle'
    assert accepted[1][2] == "Ōkami"
    # c3 starts on physical line 5: the header, c1 spanning two lines, then c2.
    assert [(r[0], r[1], r[2]) for r in rejected] == [(5, "c3", "invalid_integer(employee_count)")]


def test_malformed_rows_are_rejected_not_fatal(tmp_path):
    path = tmp_path / "crm.csv"
    path.write_text(
        ",".join(CRM.column_names) + "\n"
        "c1,a@x,A,,,,,,\n"
        "c2,b@x,B,,,,,,,x,y\n"  # too many fields (trailing empty ones are tolerated)
        "c3,c@x,C,,,,,,\n",
        encoding="utf-8",
    )
    report, accepted, rejected = _read(path, CRM)
    assert [r[0] for r in accepted] == ["c1", "c3"]
    assert report.rows_read == report.accepted + report.rejected == 3
    assert rejected[0][:3] == (3, "c2", "malformed_row(too_many_columns)")
    assert rejected[0][3] == "c2,b@x,B,,,,,,,x,y"


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "file is empty"),
        (b"customer_id,email\n", "missing required column(s): company_name"),
        (",".join(CRM.column_names).encode() + b"\n", "has a header but no data rows"),
        (",".join(CRM.column_names).encode() + b"\nc1,\xff\xfe,,,,,,,\n", "not valid UTF-8"),
    ],
)
def test_file_errors_are_one_line_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "crm.csv"
    path.write_bytes(content)
    with pytest.raises(SourceFileError) as info:
        _read(path, CRM)
    message = str(info.value)
    assert message.startswith(str(path) + ": ") and problem in message
    assert "\n" not in message


def test_missing_file_is_an_error_never_an_empty_dataset(tmp_path):
    settings = make_settings(tmp_path, tmp_path / "nowhere")
    with pytest.raises(SourceFileError, match=r"nowhere/crm.csv: file not found"):
        stage_source(CRM, settings)


def test_rejected_rows_land_in_the_warehouse(tmp_path):
    data = tmp_path / "data"
    write_csv(data / "crm.csv", CRM.column_names, [["c1"] + [""] * 8, ["c2", "", "", "", "-4"] + [""] * 4])
    settings = make_settings(tmp_path, data, shard_count=2)
    result = stage_source(CRM, settings)
    assert (result.report.accepted, result.report.rejected) == (1, 1)
    assert sum(result.staged.slice_rows.values()) == 1
    with warehouse.reader(settings.duckdb_path, 5) as con:
        got = con.execute("SELECT source, line_number, customer_id, reason FROM wh.rejected_rows").fetchall()
    assert got == [("crm", 3, "c2", "out_of_range(employee_count)")]
