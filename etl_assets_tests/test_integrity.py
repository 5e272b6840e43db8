"""What is staged is what was read, and a user's path is never a pattern (issue 18, cases 1–2).

Real DuckDB files and real Dagster runs; the file is changed for real at named points inside
the staging of a source (`stage_source(..., hook=...)`).
"""

import logging
import os
import shutil
from pathlib import Path

import duckdb
import pytest

from etl_assets.lib import staging, warehouse
from etl_assets.lib.checks import profile_checks, profile_facts
from etl_assets.lib.files import SourceChangedError, file_sha256
from etl_assets.lib.schema import SOURCES
from etl_assets.lib.settings import EtlSettings, SettingsError
from etl_assets.lib.sharding import shard_of
from etl_assets.lib.sources import stage_source
from etl_assets.tools.generate import generate
from etl_assets.tools.runner import run_pipeline
from etl_assets_tests.conftest import edit_crm, make_settings, read_export

pytestmark = pytest.mark.usefixtures("dagster_home")
CRM = SOURCES["crm"]
SHARDS = 2


def _export(settings: EtlSettings) -> bytes:
    outcome = run_pipeline(settings, echo=lambda line: None)
    assert outcome.ok, outcome.reason
    return Path(settings.export_path).read_bytes()


@pytest.fixture
def undisturbed(ran_sample, dagster_home, monkeypatch) -> tuple[Path, bytes]:
    """The sample's export from plain paths, for every comparison below."""
    settings = ran_sample(SHARDS)
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))  # the test's own instance again
    return Path(settings.data_dir), Path(settings.export_path).read_bytes()


def test_paths_are_literal_everywhere(tmp_path, undisturbed, monkeypatch):
    """Every DuckDB glob metacharacter, spaces, quotes and non-ASCII in each path the user
    gives, beside decoy folders that each pattern would match: the export equals the plain
    run's, and no decoy is read or written."""
    data, expected = undisturbed
    # DuckDB cannot open a database under a "?" (refused, see the next test), so "?" goes in
    # every other path.
    base = tmp_path / "run* [x] 'q\" é"
    # Decoys the patterns would match and the real paths do not ("[x]" matches "x" only):
    # a sibling folder with a data folder and an export of its own.
    sibling = tmp_path / "run2 x 'q\" é"
    decoy = sibling / "data X"
    decoy.mkdir(parents=True)
    for schema in SOURCES.values():
        (decoy / schema.filename).write_text(
            ",".join(schema.column_names) + "\ncust_decoy" + "," * (len(schema.columns) - 1)
            + "\n", encoding="utf-8")
    (sibling / "out X0 é.csv").write_text("customer_id\ncust_decoy\n", encoding="utf-8")
    shutil.copytree(data, base / "data ?")
    monkeypatch.setenv("DAGSTER_HOME", str(base / "dagster *[h] é"))
    (base / "dagster *[h] é").mkdir()
    (base / "dagster *[h] é" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    settings = EtlSettings.from_env(
        env={}, data_dir=str(base / "data ?"), home_dir=str(base / "home [*]?"),
        staging_dir=str(base / "staging ?*"), database=str(base / "wh [1]*.duckdb"),
        export_path=str(base / "out ?*[0] é.csv"), shard_count=SHARDS)
    assert _export(settings) == expected
    with warehouse.reader(settings.database, 5) as con:
        assert con.execute("SELECT count(*) FROM wh.customer_profiles WHERE customer_id = "
                           "'cust_decoy'").fetchone()[0] == 0
    assert sorted(p.name for p in sibling.iterdir()) == ["data X", "out X0 é.csv"]
    assert sorted(p.name for p in decoy.iterdir()) == sorted(s.filename for s in SOURCES.values())


def test_a_warehouse_path_with_a_question_mark_is_refused_in_one_line(tmp_path):
    with pytest.raises(SettingsError, match=r"DUCKDB_PATH cannot contain '\?'"):
        EtlSettings.from_env(env={"DUCKDB_PATH": str(tmp_path / "wh?.duckdb")})


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _append(path: Path) -> None:
    with open(path, "ab") as fh:
        fh.write(b"cust_appended,late@example.com,Late Inc,Retail,5,Lead,10.00,x,2024-01-01\n")


def _replace(path: Path) -> None:
    text = path.read_text(encoding="utf-8").replace("Enterprise", "Lead")
    tmp = path.with_name(".crm.csv.new")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@pytest.mark.parametrize("change", [_truncate, _append, _replace])
def test_a_file_changed_after_hashing_is_staged_as_one_real_version(
        tmp_path, sample_dir, undisturbed, change):
    """The file changes between the skip decision's hash and the read: what is staged is one
    real version of the file, named by its own hash; restored, a plain re-run heals."""
    settings = make_settings(tmp_path, sample_dir, shard_count=SHARDS)
    path = sample_dir / CRM.filename
    original = path.read_bytes()
    seen: dict[str, bytes] = {}

    def hook(point: str) -> None:
        if point == "source_after_hash":
            change(path)
            seen["version"] = path.read_bytes()

    result = stage_source(CRM, settings, hook=hook)
    staged_bytes = seen["version"]
    assert staged_bytes != original
    assert result.staged.file_sha256 == file_sha256(path)  # the version that was read
    path.write_bytes(staged_bytes)
    fresh = stage_source(CRM, make_settings(tmp_path / "fresh", sample_dir, shard_count=SHARDS))
    assert result.staged.slice_hashes == fresh.staged.slice_hashes
    assert result.report.accepted == fresh.report.accepted

    path.write_bytes(original)  # restored: a plain run gives the undisturbed export
    assert _export(settings) == undisturbed[1]


@pytest.mark.parametrize("change", [_truncate, _append])
def test_a_file_changed_during_the_read_fails_naming_it_and_stages_nothing(
        tmp_path, change):
    """Bytes that move while the snapshot is copied: one line naming the file, nothing
    published; restored, the run heals."""
    data = tmp_path / "data"
    generate(12_000, seed=5, out_dir=data)  # crm.csv over 1 MiB: the copy takes two reads
    settings = make_settings(tmp_path, data, shard_count=SHARDS)
    path = data / CRM.filename
    original = path.read_bytes()
    assert len(original) > 1 << 20

    def hook(point: str) -> None:
        if point == "source_mid_snapshot":
            change(path)

    with pytest.raises(SourceChangedError) as info:
        stage_source(CRM, settings, hook=hook)
    assert str(info.value).startswith(f"{path}: changed while being read")
    with pytest.raises(staging.StagingError):
        staging.read_pointer(settings.staging_dir, "crm")
    assert [p.name for p in (Path(settings.staging_dir) / "crm").iterdir()] == []

    path.write_bytes(original)
    outcome = run_pipeline(settings, echo=lambda line: None)
    assert outcome.ok, outcome.reason


def test_a_version_that_does_not_hold_what_its_name_says_is_rebuilt(ran_sample):
    """A staged version found under the right name but with other rows (damaged, or staged
    by older code) is never trusted on its name: the next run re-stages it, and the checks
    would have caught it."""
    settings = ran_sample(SHARDS)
    expected = Path(settings.export_path).read_bytes()
    pointer = staging.read_pointer(settings.staging_dir, "crm")
    # Put other rows under crm's version name: the billing slices of the same layout.
    other = staging.read_pointer(settings.staging_dir, "billing")
    shutil.rmtree(pointer.version_dir)
    shutil.copytree(other.version_dir, pointer.version_dir)
    assert _export(settings) == expected
    assert staging.read_pointer(settings.staging_dir, "crm").slice_rows == pointer.slice_rows

    # The same with --force, which never reuses a version.
    shutil.rmtree(pointer.version_dir)
    shutil.copytree(other.version_dir, pointer.version_dir)
    assert _export(settings.replace(force=True)) == expected


# Repeats made by hand in the published table: a customer of shard 0 copied into shard 1's
# table (labelled shard 1, or still shard 0), or given a key that is another customer's.
TAMPERED = {
    "id_in_two_shards": ("INSERT INTO customer_profiles_shard_1 SELECT * REPLACE (1 AS shard_id) "
                         "FROM customer_profiles_shard_0 ORDER BY customer_id LIMIT 1"),
    "row_labelled_with_its_own_shard": ("INSERT INTO customer_profiles_shard_1 SELECT * FROM "
                                        "customer_profiles_shard_0 ORDER BY customer_id LIMIT 1"),
    "key_in_two_shards": (
        "UPDATE customer_profiles_shard_1 SET idempotency_key = (SELECT min(idempotency_key) "
        "FROM customer_profiles_shard_0) WHERE customer_id = (SELECT min(customer_id) "
        "FROM customer_profiles_shard_1)"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_the_checks_find_a_repeated_id_or_key(ran_sample, case):
    """The checks count distinct id hashes, and count the keys only when a key is not its
    customer's id, ':' and an md5 (else distinct ids make distinct keys): a repeated id, or a
    key given to another customer, is found and fails its check."""
    settings = ran_sample(SHARDS)
    before = profile_facts(settings)
    assert before.table_rows == before.distinct_ids == before.distinct_keys > 0
    con = duckdb.connect(settings.database)
    try:
        con.execute(TAMPERED[case])
    finally:
        con.close()
    facts = profile_facts(settings)
    repeated = "distinct_keys" if case == "key_in_two_shards" else "distinct_ids"
    grown = 0 if case == "key_in_two_shards" else 1
    assert facts.table_rows == before.table_rows + grown
    assert getattr(facts, repeated) == facts.table_rows - 1
    failed = {o.name for o in profile_checks(facts, SHARDS) if not o.passed}
    assert failed >= {"no_duplicate_customer_id" if repeated == "distinct_ids"
                      else "idempotency_keys_unique"}


def test_the_checks_compare_the_exports_rows_with_the_tables(ran_sample):
    """One value changed in the published export (same length, same number of rows, sorted
    and unique as before) is found by the hash of its rows against the table's."""
    settings = ran_sample(SHARDS)
    assert all(o.passed for o in profile_checks(profile_facts(settings), SHARDS))
    export = Path(settings.export_path)
    export.write_bytes(export.read_bytes().replace(b",Active,", b",Failed,", 1))
    outcomes = {o.name: o.passed for o in profile_checks(profile_facts(settings), SHARDS)}
    assert [name for name, passed in outcomes.items() if not passed] == ["export_matches_table"]


def _crm_ids_of_shard(settings: EtlSettings, shard_id: int, count: int) -> list[str]:
    rows = read_export(Path(settings.data_dir) / CRM.filename)
    return [r["customer_id"] for r in rows if shard_of(r["customer_id"], SHARDS) == shard_id][:count]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_replaced_slice_is_never_built_on(ran_sample, caplog):
    """Issue 31, finding a: a slice swapped for another valid Parquet file with as many rows
    (the previous version's slice of the same shard) fails its recorded sha256 when the next
    edit of the source reads it, so that edit is staged from the whole file: the earlier edit
    stays in the export, with one warning line naming the slice."""
    settings = ran_sample(SHARDS)
    first, second = _crm_ids_of_shard(settings, 0, 2)
    edit_crm(Path(settings.data_dir), {first: 4321})
    _export(settings)
    edited = staging.read_pointer(settings.staging_dir, "crm")
    previous = next(p for p in Path(edited.version_dir).parent.iterdir()
                    if p.is_dir() and not p.name.startswith(".") and p.name !=
                    Path(edited.version_dir).name)
    # The edit was staged onto the previous version: shard 1's slice is the same file.
    assert os.path.samefile(edited.slice_files(1)[0],
                            previous / "shard_id=1" / Path(edited.slice_files(1)[0]).name)
    for f in edited.slice_files(0):
        os.unlink(f)
    for f in (previous / "shard_id=0").glob("*.parquet"):
        shutil.copyfile(f, Path(edited.version_dir) / "shard_id=0" / f.name)

    edit_crm(Path(settings.data_dir), {second: 1234})
    with caplog.at_level(logging.WARNING):
        _export(settings)
    rows = {r["customer_id"]: r for r in read_export(Path(settings.export_path))}
    assert (rows[first]["employee_count"], rows[second]["employee_count"]) == ("4321", "1234")
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"{Path(edited.version_dir) / 'shard_id=0'}"), warnings


def test_a_truncated_slice_is_staged_again_and_never_linked(ran_sample, caplog):
    """Issue 31, finding d: a slice cut short (DuckDB: "No magic bytes") is staged again by
    the next plain run, with one warning line naming it; and an edit of its source never
    hard-links it into the next version."""
    settings = ran_sample(SHARDS)
    expected = Path(settings.export_path).read_bytes()
    cut = Path(staging.read_pointer(settings.staging_dir, "crm").slice_files(0)[0])
    _truncate(cut)
    with caplog.at_level(logging.WARNING):
        assert _export(settings) == expected
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and warnings[0].startswith(f"{cut}:"), warnings

    cut = Path(staging.read_pointer(settings.staging_dir, "crm").slice_files(0)[0])
    _truncate(cut)
    edit_crm(Path(settings.data_dir), {_crm_ids_of_shard(settings, 1, 1)[0]: 4321})
    _export(settings)
    edited = staging.read_pointer(settings.staging_dir, "crm")
    assert edited.version_dir != str(cut.parent.parent)
    with duckdb.connect() as con:
        for k in range(SHARDS):
            rows = con.execute("SELECT count(*) FROM read_parquet(?)",
                               [edited.slice_files(k)]).fetchone()[0]
            assert rows == edited.slice_rows[k]
