"""The declaration format: each invalid declaration is one line naming the file, the line and
the field; a domain that is not customers loads, type-checks and merges; the shipped one is
today's customer domain. Fast: no pipeline runs (the real run is in test_skip.py)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from etl_assets.lib import declaration, declaration_file, freshness
from etl_assets.lib.rules import DECLARATION, ENGINE_MACROS, install_rules, merge_sql
from etl_assets.lib.schema import SCORE_COLUMNS, profile_columns
from etl_assets.lib.settings import SettingsError
from etl_assets.lib.validation import read_source
from etl_assets_tests.conftest import write_csv

# A second domain that shares nothing with customers but the engine: its own key, sources,
# kinds, a shared column preferred against declaration order, a macro and two derived columns.
FLEET = """\
# A fleet: vehicles and their trips, joined on vehicle_id.
key: vehicle_id
sources:
  vehicles:
    file: vehicles.csv
    description: "The fleet register."
    columns:
      vehicle_id: {kind: id}
      make: {kind: text, required: true}
      fuel: {kind: category, domain: [Diesel, Electric, Petrol]}
      capacity_kg: {kind: int, min: 0}
      in_service: {kind: date}
      depot: {kind: text}
  trips:
    file: trips.csv
    columns:
      vehicle_id: {kind: id}
      depot: {kind: text}
      distance_km: {kind: decimal, min: 0}
      loaded_km: {kind: decimal, min: 0}
      fuel_cost: {kind: money, min: 0}
    not_greater_than: [[loaded_km, distance_km]]
prefer:
  depot: [trips, vehicles]
macros:
  fleet_per_km:
    params: [amount, km]
    sql: CASE WHEN km > 0 THEN amount / km END
derived:
  cost_per_km: fleet_per_km(fuel_cost, distance_km)
  electric: etl_norm(fuel) = 'electric'
"""


def load(text: str, name: str = "fleet.yaml") -> declaration.Declaration:
    return declaration_file.check(declaration_file.parse(text, name), ENGINE_MACROS)


ROW = "a derived value comes from its own row, the same on every run"
TYPES = "BOOLEAN, an integer, FLOAT, DOUBLE, DECIMAL, VARCHAR, DATE, TIME or TIMESTAMP"
ELECTRIC = "etl_norm(fuel) = 'electric'"
COST = "fleet_per_km(fuel_cost, distance_km)"
DEPOT = "      depot: {kind: text}\n  trips"

# (text replaced in FLEET, or None for a whole new file; its replacement; the one line).
INVALID = [
    # Malformed YAML, with its line.
    pytest.param("make: {kind: text, required: true}", "make: {kind: text, required: true",
                 "fleet.yaml:10: malformed YAML: expected ',' or '}', but got ':'", id="yaml"),
    pytest.param("    file: trips.csv", "\tfile: trips.csv", "fleet.yaml:15: malformed YAML: "
                 "found character '\\t' that cannot start any token", id="yaml_tab"),
    pytest.param(None, "", "fleet.yaml: is empty (a declaration needs at least key and sources)",
                 id="empty"),
    pytest.param(None, "- a\n- list\n", "fleet.yaml: must be a mapping, got list ['a', 'list']",
                 id="not_a_mapping"),
    pytest.param(None, "key: vehicle_id\n", "fleet.yaml: 'sources' is required",
                 id="missing_sources"),
    pytest.param(None, '"key\\nsources": 1\n', "fleet.yaml:1: 'key\\nsources': unknown option "
                 "(one of key, sources, prefer, macros, derived, export)", id="line_break_in_a_name"),
    # Unknown kind, unknown option.
    pytest.param("{kind: int, min: 0}", "{kind: integer, min: 0}",
                 "fleet.yaml:11: sources.vehicles.columns.capacity_kg.kind: unknown kind 'integer' "
                 "(one of id, text, int, decimal, money, date, category)", id="unknown_kind"),
    pytest.param("{kind: int, min: 0}", "{kind: int, minimum: 0}",
                 "fleet.yaml:11: sources.vehicles.columns.capacity_kg.minimum: unknown option "
                 "(one of kind, min, max, domain, required)", id="unknown_column_option"),
    pytest.param("    file: trips.csv", "    file: trips.csv\n    delimiter: ';'",
                 "fleet.yaml:16: sources.trips.delimiter: unknown option "
                 "(one of file, description, columns, not_greater_than)", id="unknown_source_option"),
    pytest.param("derived:", "derive:", "fleet.yaml:29: derive: unknown option "
                 "(one of key, sources, prefer, macros, derived, export)", id="unknown_top_option"),
    pytest.param("{kind: int, min: 0}", "{min: 0}",
                 "fleet.yaml:11: sources.vehicles.columns.capacity_kg: 'kind' is required",
                 id="missing_kind"),
    # A column used in an expression that no source declares.
    pytest.param(COST, "fleet_per_km(fuel_costs, distance_km)",
                 "fleet.yaml:30: derived.cost_per_km: column 'fuel_costs' is not declared by any "
                 "source (did you mean fuel_cost?)", id="undeclared_column"),
    pytest.param(COST, "fleet_per_km(trips.fuel_cost, distance_km)",
                 "fleet.yaml:30: derived.cost_per_km: 'trips.' names a table: an expression sees "
                 "the merged row's columns by name alone", id="source_qualified"),
    # Duplicate names.
    pytest.param(ELECTRIC, f"{ELECTRIC}\n  make: upper(make)", "fleet.yaml:32: derived.make: "
                 "duplicate name: a source column is called that already", id="derived_is_a_column"),
    pytest.param(ELECTRIC, f"{ELECTRIC}\n  shard_id: 1",
                 "fleet.yaml:32: derived.shard_id: 'shard_id' is a column the engine adds",
                 id="derived_is_an_engine_column"),
    pytest.param("derived:", "  fleet_per_km:\n    params: [x]\n    sql: x\nderived:",
                 "fleet.yaml:29: macros.fleet_per_km: duplicate name (first on line 26)",
                 id="macro_twice"),
    pytest.param("  fleet_per_km:\n", "  etl_norm:\n", "fleet.yaml:26: macros.etl_norm: duplicate "
                 "name: 'etl_norm' is a DuckDB function or an engine macro", id="macro_is_engine"),
    pytest.param("  fleet_per_km:\n", "  lower:\n", "fleet.yaml:26: macros.lower: duplicate "
                 "name: 'lower' is a DuckDB function or an engine macro", id="macro_is_builtin"),
    pytest.param(DEPOT, "      depot: {kind: text}\n      Depot: {kind: text}\n  trips",
                 "fleet.yaml:14: sources.vehicles.columns.Depot: duplicate name "
                 "(as sources.vehicles.columns.depot)", id="column_twice_in_another_case"),
    pytest.param("file: trips.csv", "file: vehicles.csv", "fleet.yaml:15: sources.trips.file: "
                 "'vehicles.csv' is also the file of vehicles", id="file_twice"),
    # A derived expression (or macro) that does not type-check, or is not one expression of
    # its own row.
    pytest.param(ELECTRIC, "etl_norm(fuel) + 1", "fleet.yaml:31: derived.electric: Binder Error: "
                 "No function matches the given name and argument types '+(VARCHAR, "
                 "INTEGER_LITERAL)'. You might need to add explicit type casts.", id="type_error"),
    pytest.param(COST, COST[:-1], "fleet.yaml:30: derived.cost_per_km: syntax error at end of "
                 "input", id="syntax_error"),
    pytest.param(ELECTRIC, "make), (fuel",
                 "fleet.yaml:31: derived.electric: must be one SQL expression", id="two_columns"),
    pytest.param(ELECTRIC, "1) FROM merged WHERE (1",
                 "fleet.yaml:31: derived.electric: must be one SQL expression", id="a_clause"),
    pytest.param(ELECTRIC, "random() > 0.5", "fleet.yaml:31: derived.electric: random() is not "
                 f"the same on every run: {ROW}", id="volatile"),
    pytest.param(ELECTRIC, "row_number() OVER () > 1", "fleet.yaml:31: derived.electric: "
                 f"a window function is not allowed: {ROW}", id="window"),
    pytest.param(ELECTRIC, "sum(distance_km) > 0", "fleet.yaml:31: derived.electric: "
                 f"an aggregate is not allowed: {ROW}", id="aggregate"),
    pytest.param(ELECTRIC, "$1", "fleet.yaml:31: derived.electric: "
                 f"a parameter is not allowed: {ROW}", id="parameter"),
    pytest.param(ELECTRIC, "list_value(make, fuel)", "fleet.yaml:31: derived.electric: its type "
                 f"is VARCHAR[], not a column type ({TYPES})", id="nested_type"),
    pytest.param(ELECTRIC, "CAST(in_service AS TIMESTAMPTZ)", "fleet.yaml:31: derived.electric: "
                 f"its type is TIMESTAMP WITH TIME ZONE, not a column type ({TYPES})",
                 id="time_zone_type"),
    pytest.param("amount / km END", "amount / km", "fleet.yaml:28: macros.fleet_per_km.sql: "
                 "syntax error at or near \")\"", id="macro_syntax_error"),
    pytest.param("CASE WHEN km > 0 THEN amount / km END", "fleet_later(amount) / km",
                 "fleet.yaml:28: macros.fleet_per_km.sql: Catalog Error: Scalar Function with "
                 "name fleet_later does not exist!", id="macro_uses_an_unknown_function"),
    # Columns, keys, ranges, domains, rules, preference, export, names.
    pytest.param("      vehicle_id: {kind: id}\n      depot", "      depot",
                 "fleet.yaml:16: sources.trips.columns: no key column 'vehicle_id' (every source "
                 "carries the key)", id="no_key_column"),
    pytest.param("make: {kind: text, required: true}", "make: {kind: id}", "fleet.yaml:9: "
                 "sources.vehicles.columns.make.kind: id is the key's kind (vehicle_id); use text",
                 id="id_not_the_key"),
    pytest.param("      depot: {kind: text}\n      distance_km", "      depot: {kind: int}\n"
                 "      distance_km", "fleet.yaml:18: sources.trips.columns.depot.kind: int, but "
                 "vehicles declares depot as text (a column several sources carry has one kind)",
                 id="shared_column_kinds"),
    pytest.param("make: {kind: text, required: true}", "make: {kind: text, min: 1}",
                 "fleet.yaml:9: sources.vehicles.columns.make.min: a range is for int, decimal, "
                 "money columns, not text", id="range_on_text"),
    pytest.param("{kind: int, min: 0}", "{kind: int, min: 10, max: 5}", "fleet.yaml:11: "
                 "sources.vehicles.columns.capacity_kg.max: 5 is below min 10", id="min_above_max"),
    pytest.param(", domain: [Diesel, Electric, Petrol]", "", "fleet.yaml:10: "
                 "sources.vehicles.columns.fuel: a category needs its domain (the values it may "
                 "take)", id="category_without_domain"),
    pytest.param("[Diesel, Electric, Petrol]", "[Diesel, yes, Petrol]", "fleet.yaml:10: "
                 "sources.vehicles.columns.fuel.domain[1]: True is not a value (text without "
                 "surrounding spaces; quote it in YAML)", id="domain_value_read_as_boolean"),
    pytest.param("[Diesel, Electric, Petrol]", "[Diesel, Electric, electric]", "fleet.yaml:10: "
                 "sources.vehicles.columns.fuel.domain[2]: 'electric' is 'Electric' once "
                 "normalized (case, spaces, - and _ do not tell values apart)",
                 id="domain_values_alike"),
    pytest.param("[[loaded_km, distance_km]]", "[[loaded_km, depot]]", "fleet.yaml:22: "
                 "sources.trips.not_greater_than[0]: compares two numbers or two dates",
                 id="not_greater_than_kinds"),
    pytest.param("depot: [trips, vehicles]", "depot: [trips]", "fleet.yaml:24: prefer.depot: "
                 "must list the sources that carry depot, each once, the preferred first: "
                 "vehicles, trips in some order", id="prefer_incomplete"),
    pytest.param("derived:", "export: [vehicle_id, mke]\nderived:",
                 "fleet.yaml:29: export[1]: no source or derived column is called 'mke'",
                 id="export_unknown_column"),
    pytest.param(DEPOT, "      depot: {kind: text}\n      order: {kind: text}\n  trips",
                 "fleet.yaml:14: sources.vehicles.columns.order: 'order' is an SQL keyword; "
                 "choose another name", id="keyword"),
    pytest.param(DEPOT, "      depot: {kind: text}\n      row_hash: {kind: text}\n  trips",
                 "fleet.yaml:14: sources.vehicles.columns.row_hash: 'row_hash' is a column the "
                 "engine adds (one of rec, row_hash, reason, shard_id, idempotency_key)",
                 id="engine_column"),
    pytest.param("  fleet_per_km:\n", "  fleet-per-km:\n", "fleet.yaml:26: macros.fleet-per-km: "
                 "'fleet-per-km' is not a name (letters, digits and _, not starting with a "
                 "digit)", id="not_a_name"),
]


@pytest.mark.parametrize("old, new, line", INVALID)
def test_an_invalid_declaration_is_one_line_naming_file_line_and_field(old, new, line):
    assert old is None or FLEET.count(old) == 1, f"the case must edit FLEET in one place: {old!r}"
    text = new if old is None else FLEET.replace(old, new)
    with pytest.raises(SettingsError) as raised:  # the CLI's exit 2, nothing run
        load(text)
    assert str(raised.value) == line


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(SettingsError, match=r"^\S+/absent\.yaml: no such file or directory$"):
        declaration_file.load(tmp_path / "absent.yaml", ENGINE_MACROS)


def test_another_domain_loads_type_checks_and_merges():
    fleet = load(FLEET)
    assert fleet.key == "vehicle_id"
    assert [s.name for s in fleet.sources] == ["vehicles", "trips"]
    assert fleet.sources[1].not_greater_than == (("loaded_km", "distance_km"),)
    assert [(d.name, d.sql_type) for d in fleet.derived] == [("cost_per_km", "DOUBLE"),
                                                             ("electric", "BOOLEAN")]
    # The default export: the key, each source's columns in declaration order, the derived.
    assert fleet.export == ("vehicle_id", "make", "fuel", "capacity_kg", "in_service", "depot",
                            "distance_km", "loaded_km", "fuel_cost", "cost_per_km", "electric")
    assert fleet.carriers("depot") == ("trips", "vehicles")
    # The merge query of this declaration, on two vehicles: trips' depot wins over the
    # register's, the register's fills a gap; derived values computed over the merged row.
    con = duckdb.connect()
    try:
        for sql in ENGINE_MACROS + tuple(m.create_sql for m in fleet.macros):
            con.execute(sql)
        con.execute("CREATE TABLE vehicles AS SELECT * FROM (VALUES ('v1', 'Volvo', 'Electric', "
                    "1000, DATE '2024-01-01', 'North', 'h1'), ('v2', 'MAN', 'Diesel', 2000, NULL, "
                    "'South', 'h2')) t(vehicle_id, make, fuel, capacity_kg, in_service, depot, "
                    "row_hash)")
        con.execute("CREATE TABLE trips AS SELECT * FROM (VALUES ('v1', 'East', 100.0, 50.0, "
                    "CAST(25 AS DECIMAL(18,2)), 'h3')) t(vehicle_id, depot, distance_km, "
                    "loaded_km, fuel_cost, row_hash)")
        rows = con.execute(f"SELECT vehicle_id, depot, cost_per_km, electric FROM "
                           f"({merge_sql(fleet)}) ORDER BY vehicle_id", {"shard_id": 0}).fetchall()
    finally:
        con.close()
    assert rows == [("v1", "East", 0.25, True), ("v2", "South", None, False)]


def test_the_shipped_declaration_is_todays_customer_domain():
    """The profile row as it was defined in code before the declaration (issue 33)."""
    assert profile_columns() == [
        ("customer_id", "VARCHAR"), ("email", "VARCHAR"), ("company_name", "VARCHAR"),
        ("industry", "VARCHAR"), ("employee_count", "BIGINT"), ("deal_stage", "VARCHAR"),
        ("deal_value", "DECIMAL(18,2)"), ("sales_owner", "VARCHAR"), ("last_contact", "DATE"),
        ("plan", "VARCHAR"), ("mrr", "DECIMAL(18,2)"), ("payment_status", "VARCHAR"),
        ("subscription_start", "DATE"), ("last_payment", "DATE"), ("signup_date", "DATE"),
        ("last_active", "DATE"), ("total_sessions", "BIGINT"), ("features_used", "BIGINT"),
        ("usage_pct", "DOUBLE"), ("account_status", "VARCHAR"), ("total_tickets", "BIGINT"),
        ("open_tickets", "BIGINT"), ("avg_resolution_hrs", "DOUBLE"),
        ("last_ticket_date", "DATE"), ("nps_score", "BIGINT"), ("csat_score", "DOUBLE"),
        ("health_score", "INTEGER"), ("churn_risk", "VARCHAR"), ("expansion_potential", "VARCHAR"),
        ("shard_id", "INTEGER"), ("idempotency_key", "VARCHAR"),
    ]
    assert SCORE_COLUMNS == (("health_score", "INTEGER"), ("churn_risk", "VARCHAR"),
                             ("expansion_potential", "VARCHAR"))
    assert DECLARATION.prefer == (("email", ("crm", "billing", "product", "support")),)
    assert declaration.SHIPPED.is_file()


def test_the_code_version_follows_what_shapes_a_row_and_nothing_else():
    text = declaration.SHIPPED.read_text(encoding="utf-8")
    shipped = load(text, "customers.yaml")
    assert shipped.digest == DECLARATION.digest
    code_version = f"{freshness.ENGINE_VERSION}-{DECLARATION.digest[:16]}"
    assert code_version == freshness.CODE_VERSION
    assert DECLARATION.sources_digest[:12] in freshness.staging_code()
    # A description only documents; a comment is not the declaration.
    reworded = load(text.replace("Support desk:", "The help desk:")
                    .replace("# CRM is the", "# CRM, the"), "customers.yaml")
    assert (reworded.digest, reworded.sources_digest) == (shipped.digest, shipped.sources_digest)
    # A derived expression: every shard, not the staging.
    scored = load(text.replace("health_score: etl_health_score(usage_pct, payment_status, "
                               "nps_score, open_tickets)", "health_score: etl_health_score("
                               "usage_pct, payment_status, nps_score, open_tickets) + 1"),
                  "customers.yaml")
    assert scored.digest != shipped.digest and scored.sources_digest == shipped.sources_digest
    # A range: the staging too.
    ranged = load(text.replace("nps_score: {kind: int, min: 0, max: 10}",
                               "nps_score: {kind: int, min: 0, max: 11}"), "customers.yaml")
    assert ranged.digest != shipped.digest and ranged.sources_digest != shipped.sources_digest


def test_a_required_column_quarantines_a_row_without_it(tmp_path: Path):
    accounts = load("key: customer_id\nsources:\n  accounts:\n    file: accounts.csv\n"
                    "    columns:\n      customer_id: {kind: id}\n"
                    "      name: {kind: text, required: true}\n      note: {kind: text}\n")
    schema = accounts.sources[0]
    path = write_csv(tmp_path / "accounts.csv", schema.column_names,
                     [["c1", "Ada", ""], ["c2", "  ", "blank name"], ["c3", None, None]])
    con = duckdb.connect()
    try:
        install_rules(con)
        report = read_source(con, path, schema)
        rejected = con.execute("SELECT customer_id, reason FROM rejected ORDER BY 1").fetchall()
    finally:
        con.close()
    assert (report.accepted, report.rejected) == (1, 2)
    assert rejected == [("c2", "missing(name)"), ("c3", "missing(name)")]
