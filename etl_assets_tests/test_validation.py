"""Reading source files: file-level errors are one clear line; bad rows are quarantined."""

import json
import math
from decimal import Decimal

import duckdb
import pytest

from etl_assets.lib import errors, publish, warehouse
from etl_assets.lib.schema import SOURCES
from etl_assets.lib.sharding import shard_of
from etl_assets.lib.sources import stage_source
from etl_assets.lib.validation import SourceFileError, read_source
from etl_assets_tests.conftest import (
    SAMPLE,
    build_profiles,
    make_settings,
    read_export,
    write_csv,
    write_sources,
)

SUPPORT = SOURCES["support"]
CRM = SOURCES["crm"]


def _read(path, schema):
    con = duckdb.connect()
    from etl_assets.lib.rules import install_rules

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


# Values at the edge of the validation's shortcuts: ASCII and not, spaces (Zs and others) at
# either end or inside, empty, canonical and other spellings of a category.
EDGE_VALUES = ["", " ", "a", " a", "a ", "ab", "a b", "\u00a0a", "a\u00a0", "\u3000", "\u2009x\u200a",
               "\ta\t", "a\u0085", "é", " é", "é ", "xé", "\x7f", "Active", "active", " Active",
               "Active ", "Past Due", "past  due", "PAST-DUE", "Past\u00a0Due", "Failed\u3000", None]


def test_shortcuts_for_plain_values_agree_with_the_rules():
    """The validation skips trim() for an ASCII value with no space at either end and the
    normalizing regex for a category value spelled canonically; both must give what the rule
    gives, for every value."""
    con = duckdb.connect()
    from etl_assets.lib.rules import install_rules
    from etl_assets.lib.schema import PAYMENT_STATUSES
    from etl_assets.lib.validation import _trimmed, _typed_expr, normalized

    install_rules(con)
    column = next(c for c in SOURCES["billing"].columns if c.name == "payment_status")
    con.execute("CREATE TABLE t AS SELECT unnest($values) AS v", {"values": EDGE_VALUES})
    params = {"domain_payment_status": list(PAYMENT_STATUSES),
              "normalized_payment_status": normalized(con, PAYMENT_STATUSES)}
    rows = con.execute(
        f"""SELECT v, {_trimmed("v")}, nullif(trim(v), ''),
                   (SELECT {_typed_expr(column)} FROM (SELECT v AS v_payment_status)),
                   list_extract($domain_payment_status, list_position(
                       $normalized_payment_status, etl_norm(v)))
            FROM t""", params).fetchall()
    assert [(v, a, c) for v, a, _, c, _ in rows] == [(v, b, d) for v, _, b, _, d in rows]
    # Both paths are taken: some values are trimmed or normalized, some are not.
    assert any(a != v for v, a, *_ in rows if v) and any(c == v for v, _, _, c, _ in rows)
    with pytest.raises(ValueError, match="normalize alike"):
        normalized(con, ("Past Due", "past_due"))


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
        (",".join(CRM.column_names).encode() + b",n\xe4me\nc1,,,,,,,,,\n",
         "header is not valid UTF-8"),
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
    with warehouse.reader(settings.database, 5) as con:
        got = con.execute("SELECT source, line_number, customer_id, reason FROM wh.rejected_rows").fetchall()
    assert got == [("crm", 3, "c2", "out_of_range(employee_count)")]


INVALID_ID, MISSING_ID = "invalid_customer_id", "missing_customer_id"


@pytest.mark.parametrize(
    "raw, stored, reason",
    [
        ("\tc1\t", "c1", None),  # tab at the ends: trimmed (DuckDB's trim() keeps it)
        ("c1\u00a0", "c1", None),  # NBSP at the end
        ("\u2003c1\u3000", "c1", None),  # em space, ideographic space
        ("\x85\x1c\x0bc1\r", "c1", None),  # NEL, file separator, vertical tab: str.isspace()
        ("c 1", "c 1", None),  # a plain space inside is part of the id
        ("c\t1", "c\t1", INVALID_ID),  # tab inside
        ("\u200bc1", "\u200bc1", INVALID_ID),  # zero-width space: not whitespace, not trimmed
        ("\ufeffc1", "\ufeffc1", INVALID_ID),  # BOM at the start of a row's id
        ("c1\u200f", "c1\u200f", INVALID_ID),  # right-to-left mark
        ("c\u00a01", "c\u00a01", INVALID_ID),  # NBSP inside prints like "c 1"
        ("c\u20031", "c\u20031", INVALID_ID),  # em space inside
        ("c\u20281", "c\u20281", INVALID_ID),  # line separator
        (" \t\u00a0\u2003 ", None, MISSING_ID),  # only whitespace
    ],
)
def test_one_rule_for_ids(tmp_path, raw, stored, reason):
    path = write_csv(tmp_path / "crm.csv", CRM.column_names, [["c0"] + [""] * 8, [raw] + [""] * 8])
    report, accepted, rejected = _read(path, CRM)
    assert report.rows_read == 2
    if reason is None:
        assert [r[0] for r in accepted] == sorted(["c0", stored]) and rejected == []
    else:
        assert [r[0] for r in accepted] == ["c0"]
        # rejected_rows shows the id as the rule trimmed it; raw keeps it as read.
        assert [r[1:3] for r in rejected] == [(stored, reason)]
        assert json.loads(rejected[0][3])["customer_id"] == raw


def test_ids_equal_after_trimming_are_one_customer_in_every_source(tmp_path):
    data = tmp_path / "data"
    write_sources(data, {
        "crm": [{"customer_id": "\tc1 ", "email": "crm@x"}],
        "billing": [{"customer_id": "c1\u00a0", "mrr": "10"}],
        "product": [{"customer_id": "\u2003c1", "usage_pct": "90"}],
        "support": [{"customer_id": "c1", "nps_score": "9"}, {"customer_id": "c1\u200b"}],
    })
    settings = make_settings(tmp_path, data, shard_count=7)
    # Routing hashes the trimmed id: a row hashed as read would land on another shard.
    assert shard_of("\tc1 ", 7) != shard_of("c1", 7)
    profiles = build_profiles(settings)
    assert list(profiles) == ["c1"]
    assert profiles["c1"]["shard_id"] == shard_of("c1", 7)
    assert (profiles["c1"]["email"], profiles["c1"]["mrr"], profiles["c1"]["usage_pct"],
            profiles["c1"]["nps_score"]) == ("crm@x", Decimal("10.00"), 90.0, 9)
    with warehouse.reader(settings.database, 5) as con:
        got = con.execute("SELECT source, customer_id, reason FROM wh.rejected_rows").fetchall()
    assert got == [("support", "c1\u200b", INVALID_ID)]


def test_malformed_row_id_is_trimmed_by_the_same_rule(tmp_path):
    path = tmp_path / "crm.csv"
    path.write_text(",".join(CRM.column_names) + "\n\tc1\u00a0,a@x,A,,,,,,,x,y\n", encoding="utf-8")
    _, _, rejected = _read(path, CRM)
    assert rejected[0][1:3] == ("c1", "malformed_row(too_many_columns)")


BILLING = SOURCES["billing"]


@pytest.mark.parametrize(
    "raw, mrr, reason",
    [
        ("0.005", None, "too_many_decimals(mrr)"),  # was rounded to 0.01
        ("12.345", None, "too_many_decimals(mrr)"),  # was rounded to 12.35
        ("12.3400001", None, "too_many_decimals(mrr)"),
        ("12.340", Decimal("12.34"), None),  # trailing zeros add no precision
        ("12.3400000", Decimal("12.34"), None),
        ("7.", Decimal("7.00"), None),
        ("+.5", Decimal("0.50"), None),
        ("-0.00", Decimal("0.00"), None),
        ("1e3", None, "invalid_decimal(mrr)"),  # plain decimals only: no exponent
        ("1E3", None, "invalid_decimal(mrr)"),
        ("1234567890123456.78", Decimal("1234567890123456.78"), None),  # 16 digits: fits
        ("12345678901234567", None, "out_of_range(mrr)"),  # 17: past DECIMAL(18,2)
    ],
)
def test_money_is_exact_or_rejected(tmp_path, raw, mrr, reason):
    path = write_csv(tmp_path / "billing.csv", BILLING.column_names,
                     [["b1", "", "", raw, "", "", ""]])
    _, accepted, rejected = _read(path, BILLING)
    assert [r[3] for r in accepted] == ([] if reason else [mrr])
    assert [r[2] for r in rejected] == ([reason] if reason else [])


@pytest.mark.parametrize(
    "raw, hours, reason",
    [
        ("1234567890123456789012345678901234567890", None, "too_many_digits(avg_resolution_hrs)"),
        ("9" * 400, None, "too_many_digits(avg_resolution_hrs)"),  # would be inf
        ("1234567890123456", None, "too_many_digits(avg_resolution_hrs)"),  # 16 digits
        ("1000000000000000", None, "too_many_digits(avg_resolution_hrs)"),  # zeros written count
        ("0.1234567890123456", None, "too_many_digits(avg_resolution_hrs)"),
        ("123456789012.345", 123456789012.345, None),  # 15 digits: held exactly as written
        ("0.000000000000001234", 1.234e-15, None),  # leading zeros are not digits held
        ("0012.500000000000000000", 12.5, None),  # nor are trailing zeros after the point
    ],
)
def test_decimals_hold_at_most_15_significant_digits(tmp_path, raw, hours, reason):
    path = write_csv(tmp_path / "support.csv", SUPPORT.column_names,
                     [["s1", "", "", "", raw, "", "", ""]])
    _, accepted, rejected = _read(path, SUPPORT)
    assert [r[4] for r in accepted] == ([] if reason else [hours])
    if hours is not None:
        assert repr(accepted[0][4]) == repr(hours)  # prints back as written
    assert [r[2] for r in rejected] == ([reason] if reason else [])


@pytest.mark.parametrize(
    "raw, tickets, reason",
    [
        ("9223372036854775807", 9223372036854775807, None),  # BIGINT's largest
        ("9223372036854775808", None, "out_of_range(total_tickets)"),
        ("-9223372036854775809", None, "out_of_range(total_tickets)"),
        ("123456789012345678901234567890", None, "out_of_range(total_tickets)"),
        ("12.0", None, "invalid_integer(total_tickets)"),
    ],
)
def test_integers_past_bigint_are_out_of_range(tmp_path, raw, tickets, reason):
    path = write_csv(tmp_path / "support.csv", SUPPORT.column_names,
                     [["s1", "", raw, "", "", "", "", ""]])
    _, accepted, rejected = _read(path, SUPPORT)
    assert [r[2] for r in accepted] == ([] if reason else [tickets])
    assert [r[2] for r in rejected] == ([reason] if reason else [])


def test_minus_zero_is_stored_and_exported_as_zero(tmp_path):
    data = tmp_path / "data"
    write_sources(data, {
        "crm": [{"customer_id": "z1"}],
        "billing": [{"customer_id": "z1", "mrr": "-0.00"}],
        "product": [{"customer_id": "z1", "usage_pct": "-0"}],
        "support": [{"customer_id": "z1", "avg_resolution_hrs": "-0.0", "csat_score": "-0"}],
    })
    settings = make_settings(tmp_path, data)
    profile = build_profiles(settings)["z1"]
    for column in ("usage_pct", "avg_resolution_hrs", "csat_score"):
        assert math.copysign(1.0, profile[column]) == 1.0, column  # -0.0 == 0.0 in Python
    with warehouse.reader(settings.database, 5) as con:  # the real publish path
        publish.publish_customer_profiles(con, publish.Targets.of(settings),
                                          {"shards_hash": "test", "code_version": "test"})
    exported = read_export(settings.export_path)[0]
    assert {c: exported[c] for c in ("mrr", "usage_pct", "avg_resolution_hrs", "csat_score")} \
        == {"mrr": "0.00", "usage_pct": "0.0", "avg_resolution_hrs": "0.0", "csat_score": "0.0"}


def test_a_row_with_invalid_utf8_is_quarantined_with_its_bytes(tmp_path):
    """One bad byte is that row's problem: rejected as invalid_utf8 with the file's own bytes
    escaped in `raw`; every other row is read, and rows read = accepted + rejected."""
    rows = [f"c{i:05d},c{i}@x.com,Co {i},Retail,{i},Lead,1.00,ann,2024-01-01".encode()
            for i in range(5000)]
    rows[3999] = b"c03999,c3999@x.com,Caf\xe9 \xff,Retail,3,Lead,1.00,ann,2024-01-01"
    path = tmp_path / "crm.csv"
    path.write_bytes(b"\n".join([",".join(CRM.column_names).encode(), *rows]) + b"\n")
    report, accepted, rejected = _read(path, CRM)
    assert (report.rows_read, report.accepted, report.rejected) == (5000, 4999, 1)
    assert rejected == [(4001, "c03999", "invalid_utf8",
                         "c03999,c3999@x.com,Caf\\xe9 \\xff,Retail,3,Lead,1.00,ann,2024-01-01")]
    # The escaped text gives the original bytes back.
    assert rejected[0][3].encode().decode("unicode_escape").encode("latin-1") == rows[3999]


def test_a_file_mostly_not_utf8_fails_its_source_naming_the_encoding(tmp_path, dagster_home):
    from etl_assets.tools.runner import run_pipeline

    data = write_sources(tmp_path / "data", {"crm": [
        {"customer_id": f"c{i}", "company_name": "Caf\u00e9", "employee_count": 1}
        for i in range(50)]})
    crm = data / "crm.csv"
    crm.write_bytes(crm.read_text(encoding="utf-8").encode("latin-1"))  # é as one byte
    outcome = run_pipeline(make_settings(tmp_path, data), echo=lambda line: None)
    assert not outcome.ok
    assert outcome.reason == ("crm: 50 of 50 rows rejected as invalid (100.0%, limit 1.0%), "
                              "most often invalid_utf8")


def test_every_profile_row_at_the_field_limit_fits_the_readers_line_limit():
    """The export re-read (checks, drill) must carry any row the sources accept: every profile
    column at MAX_FIELD_BYTES, each byte a quote doubled, plus separators."""
    from etl_assets.lib.schema import MAX_FIELD_BYTES, MAX_LINE_BYTES, profile_columns

    columns = len(profile_columns())
    assert columns * (2 * MAX_FIELD_BYTES + 3) < MAX_LINE_BYTES


@pytest.mark.parametrize("extra, reason", [(0, None), (1, "field_too_long(company_name)")])
def test_a_field_at_the_limit_goes_through_and_past_it_is_quarantined(
        tmp_path, dagster_home, extra, reason):
    """At MAX_FIELD_BYTES the row is staged, merged, exported and re-read by the checks; one
    byte more and it is rejected with its own reason, the run still succeeding."""
    from etl_assets.lib.schema import MAX_FIELD_BYTES
    from etl_assets.tools.runner import run_pipeline

    name = '"Big, Co' + "é" * ((MAX_FIELD_BYTES - 8) // 2) + "x" * ((MAX_FIELD_BYTES - 8) % 2)
    name += "x" * extra
    assert len(name.encode()) == MAX_FIELD_BYTES + extra
    rows = {"crm": [{"customer_id": "c1", "company_name": name, "employee_count": 1},
                    {"customer_id": "c2", "company_name": "Small", "employee_count": 2}]}
    rows.update({s: [{"customer_id": "c1"}, {"customer_id": "c2"}]
                 for s in ("billing", "product", "support")})
    settings = make_settings(tmp_path, write_sources(tmp_path / "data", rows), shard_count=2,
                             max_reject_fraction=1.0)
    outcome = run_pipeline(settings, echo=lambda line: None)
    assert outcome.ok, outcome.reason
    export = {r["customer_id"]: r for r in read_export(settings.export_path)}
    with warehouse.reader(settings.database, 5) as con:
        rejected = con.execute("SELECT customer_id, reason FROM wh.rejected_rows").fetchall()
    if reason is None:
        assert export["c1"]["company_name"] == name and rejected == []
    else:
        assert export["c1"]["company_name"] == "" and rejected == [("c1", reason)]


def test_a_bad_byte_in_an_extra_column_is_quarantined(tmp_path):
    """A column the schema does not know is kept out of the profiles, but its bytes are still
    the row's: invalid UTF-8 there rejects the row, as anywhere else in it."""
    header = ",".join([*SOURCES["billing"].column_names, "note"]).encode()
    good = b"c00001,a@x.com,Professional,10.00,Active,2024-01-01,2024-02-01,fine"
    bad = b"c00002,b@x.com,Professional,10.00,Active,2024-01-01,2024-02-01,bad \xff"
    data = tmp_path / "data"
    write_sources(data, {})
    (data / "billing.csv").write_bytes(b"\n".join([header, good, bad]) + b"\n")
    settings = make_settings(tmp_path, data)
    result = stage_source(SOURCES["billing"], settings)
    assert (result.report.accepted, result.report.rejected) == (1, 1)
    assert result.report.reasons == {"invalid_utf8": 1}


def test_out_of_memory_names_the_memory_limit_not_the_file(tmp_path, sample_dir):
    """Issue 31, finding 6: DUCKDB_MEMORY_LIMIT=20MB was reported as "billing.csv: cannot be
    parsed as CSV: Out of Memory Error", blaming the user's file."""
    settings = make_settings(tmp_path, sample_dir, memory_limit="20MB")
    with pytest.raises(errors.MemoryLimitError) as caught:
        stage_source(SOURCES["billing"], settings)
    message = str(caught.value)
    assert "DUCKDB_MEMORY_LIMIT=20MB" in message and "raise it" in message
    assert "billing.csv" not in message and "parsed" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize("record, reason", [
    ("cust_00000900,a@b.example.com,Acme,Energy,5,Lead,10.00,Bob,2025-01-01,EXTRA",
     "malformed_row(too_many_columns)"),
    ('cust_00000900,"a\nb",Acme', "malformed_row(missing_columns)"),
])
def test_a_malformed_record_after_an_empty_line_is_quarantined_not_a_crash(tmp_path, record,
                                                                           reason):
    """The reader's copy of a record it refused begins with the empty line's break; reading
    its id with csv.reader([line]) raised "new-line character seen in unquoted field" and the
    whole run failed instead of quarantining one row."""
    good = (SAMPLE / "crm.csv").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "crm.csv"
    path.write_text("\n".join([*good[:2], "", record, *good[2:6]]) + "\n", encoding="utf-8")
    report, accepted, rejected = _read(path, CRM)
    assert (report.accepted, report.rejected, len(accepted)) == (5, 1, 5)
    assert [r[:3] for r in rejected] == [(4, "cust_00000900", reason)]
