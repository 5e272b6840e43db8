"""A warehouse and a staging folder belong to one pipeline, and its tables follow its
declaration as it is edited (etl_assets.lib.ownership). In-process runs of the fleet (300
vehicles) and the customer sample, a real Dagster instance and real DuckDB files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import pytest

from etl_assets.lib import warehouse
from etl_assets.lib.ownership import OtherPipelineError
from etl_assets.tools.runner import run_pipeline
from etl_assets_tests.conftest import make_settings
from etl_assets_tests.test_other_domain import FLEET, write_fleet
from etl_assets_tests.test_pipeline import SAMPLE_EXPORT_SHA256


def _quiet(line: str) -> None:
    pass


def _tables(path: str) -> dict[str, list[tuple]]:
    """Every table of a warehouse file, its rows sorted."""
    with duckdb.connect(path, read_only=True) as con:
        names = [row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()]
        return {name: sorted(con.execute(f'SELECT * FROM "{name}"').fetchall(), key=repr)
                for name in names}


def _fleet(tmp_path: Path, text: str = FLEET, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    declaration = tmp_path / "fleet.yaml"
    declaration.write_text(text, encoding="utf-8")
    if not (tmp_path / "fleet_data").is_dir():
        write_fleet(tmp_path / "fleet_data")
    return make_settings(tmp_path, tmp_path / "fleet_data", pipeline=str(declaration),
                         shard_count=3, **overrides)


# The declaration edited as a user would: two columns swapped (same type: by position they
# would trade values), one source column dropped and a derived column added.
EDITED = FLEET.replace(
    "      make: {kind: text}\n      fuel: {kind: category, domain: [Diesel, Petrol, Electric]}\n",
    "      fuel: {kind: category, domain: [Diesel, Petrol, Electric]}\n      make: {kind: text}\n",
).replace("      last_trip: {kind: date}\n", "").replace(
    "  mileage: fleet_band(km)\n", "  mileage: fleet_band(km)\n  km_left: 10000 - km\n")


def test_an_edited_declaration_gives_the_export_of_a_fresh_home(tmp_path, instance):
    assert EDITED.count("km_left") == 1 and "last_trip" not in EDITED.split("derived:")[0]
    settings = _fleet(tmp_path)
    assert run_pipeline(settings, echo=_quiet, instance=instance).ok
    edited = _fleet(tmp_path, EDITED)
    outcome = run_pipeline(edited, echo=_quiet, instance=instance)
    assert outcome.ok, outcome.reason
    export = Path(edited.export_path).read_bytes()
    assert export.splitlines()[0].decode() == ",".join([
        "vehicle_id", "fuel", "make", "bought", "price", "trips", "km", "services", "faults",
        "km_per_trip", "mileage", "km_left", "shard_id", "idempotency_key"])
    # The same declaration in a home of its own: the same bytes.
    fresh = _fleet(tmp_path / "fresh", EDITED)
    assert run_pipeline(fresh, echo=_quiet, instance=instance).ok
    assert Path(fresh.export_path).read_bytes() == export
    # And back: the first declaration again gives its export again.
    again = _fleet(tmp_path)
    assert run_pipeline(again, echo=_quiet, instance=instance).ok
    first = _fleet(tmp_path / "first")
    assert run_pipeline(first, echo=_quiet, instance=instance).ok
    assert Path(again.export_path).read_bytes() == Path(first.export_path).read_bytes()


def test_a_warehouse_staging_folder_or_export_of_another_pipeline_is_refused_unchanged(
        tmp_path, sample_dir, instance):
    fleet = _fleet(tmp_path)
    assert run_pipeline(fleet, echo=_quiet, instance=instance).ok
    held = _tables(fleet.database)
    customers = make_settings(tmp_path / "c", sample_dir, shard_count=4)
    export = Path(fleet.export_path).read_bytes()
    for field, what, variable in (("database", "tables", "DUCKDB_PATH"),
                                  ("staging_dir", "staged files", "STAGING_DIR"),
                                  ("export_path", "export", "EXPORT_PATH")):
        place = getattr(fleet, field)
        outcome = run_pipeline(customers.model_copy(update={field: place}), echo=_quiet,
                               instance=instance)
        assert outcome.reason.endswith(
            f"{place}: holds the {what} of pipeline 'fleet', not of pipeline 'customers': give "
            f"each pipeline its own (without {variable}, 'customers' has them under <home>/)"), \
            outcome.reason
        assert _tables(fleet.database) == held
        assert Path(fleet.export_path).read_bytes() == export
    # Each on its own: both run, the customers with the sample's export.
    assert run_pipeline(customers, echo=_quiet, instance=instance).ok
    digest = hashlib.sha256(Path(customers.export_path).read_bytes()).hexdigest()
    assert digest == SAMPLE_EXPORT_SHA256
    assert run_pipeline(fleet, echo=_quiet, instance=instance).ok


def test_a_warehouse_from_before_the_record_is_its_keys_pipelines(tmp_path, instance):
    """Made by older code (no `pipeline` table): the pipeline whose key its profiles carry
    claims it; another is refused."""
    fleet = _fleet(tmp_path)
    assert run_pipeline(fleet, echo=_quiet, instance=instance).ok
    with duckdb.connect(fleet.database) as con:
        con.execute("DROP TABLE pipeline")
    other = _fleet(tmp_path / "other", FLEET.replace("vehicle_id", "unit_id"))
    with pytest.raises(OtherPipelineError, match="another pipeline .keyed on vehicle_id"), \
            warehouse.scratch() as con, \
            warehouse.attached(con, fleet.database, 5, decl=other.declaration):
        pass
    with warehouse.scratch() as con, warehouse.attached(con, fleet.database, 5,
                                                        decl=fleet.declaration):
        pass
    assert _tables(fleet.database)["pipeline"] == [("fleet",)]
