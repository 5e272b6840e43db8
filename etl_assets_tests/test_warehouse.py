"""The warehouse's rebuild of customer_profiles, on a real DuckDB file."""

from __future__ import annotations

from pathlib import Path

import pytest

from etl_assets.lib import profile_tables, warehouse
from etl_assets_tests.conftest import build_profiles, make_settings


def _insert_copy_of_shard_row(con, customer_id: str, shard_id: int) -> None:
    """Write one existing profile row a second time, as a shard that ran twice would."""
    con.execute(
        """INSERT INTO wh.shard_profiles
           SELECT * REPLACE (CAST(? AS INTEGER) AS shard_id) FROM wh.shard_profiles
           WHERE customer_id = ?""",
        [shard_id, customer_id],
    )


def test_rebuild_keeps_one_row_per_idempotency_key(tmp_path, sample_dir):
    """A repeated key (the same record written again under another shard id) yields one
    profile row, the one from its own shard; without repeats every shard row is kept, each
    shard's rows sorted by customer_id (customer_profiles is a view over one table per shard;
    the export is what is sorted as a whole)."""
    settings = make_settings(tmp_path, sample_dir, shard_count=3)
    profiles = build_profiles(settings)
    first = sorted(profiles)[0]
    with warehouse.reader(settings.database, 5) as con:
        rows = con.execute("SELECT count(*) FROM wh.shard_profiles").fetchone()[0]
        assert profile_tables.rebuild_customer_profiles(con, settings.shard_count) == rows
        ids = [r[0] for r in con.execute("SELECT customer_id FROM wh.customer_profiles").fetchall()]
        assert len(ids) == len(set(ids)) == len(profiles)
        for shard in range(settings.shard_count):
            in_shard = [r[0] for r in con.execute(
                "SELECT customer_id FROM wh.customer_profiles WHERE shard_id = ?", [shard]).fetchall()]
            assert in_shard == sorted(in_shard) and in_shard

        home = profiles[first]["shard_id"]
        _insert_copy_of_shard_row(con, first, shard_id=home + 7)
        assert con.execute("SELECT count(*) FROM wh.shard_profiles").fetchone()[0] == rows + 1
        assert profile_tables.rebuild_customer_profiles(con, settings.shard_count) == rows
        kept = con.execute("SELECT shard_id FROM wh.customer_profiles WHERE customer_id = ?",
                           [first]).fetchall()
        assert kept == [(home,)]


def test_a_repeated_key_is_probed_in_the_shards_about_to_be_written(tmp_path, sample_dir):
    """A publish that writes some shards probes those for a repeated key (a key names its
    customer, who routes to one shard): a repeat there asks for the one-per-key QUALIFY, a
    repeat elsewhere does not."""
    settings = make_settings(tmp_path, sample_dir, shard_count=3)
    profiles = build_profiles(settings)
    first = sorted(profiles)[0]
    home = profiles[first]["shard_id"]
    other = (home + 1) % 3
    with warehouse.reader(settings.database, 5) as con:
        assert profile_tables.one_per_key_sql(con, 3) == profile_tables.one_per_key_sql(con, 3, [home]) == ""
        _insert_copy_of_shard_row(con, first, shard_id=home)
        for shards in (None, [home], [other, home]):
            assert "QUALIFY" in profile_tables.one_per_key_sql(con, 3, shards), shards
        one_per_key = profile_tables.one_per_key_sql
        assert one_per_key(con, 3, [other]) == one_per_key(con, 3, []) == ""


def test_export_merged_from_parts_is_the_whole_table_copy(tmp_path):
    """The export merged from per-shard sorted parts has exactly the bytes of one sorted COPY
    of all rows: plain parts, and parts whose ids need quotes (commas, quotes, bytes below the
    comma) or whose values hold line breaks."""
    import random

    import duckdb

    from etl_assets.lib import export_parts

    rng = random.Random(7)
    alphabet = ["a", "Z", "0", "_", "-", " ", "!", '"', ",", "~", "é", "中", "😀", "\r", "\n"]
    con = duckdb.connect()
    con.execute("CREATE TABLE t (customer_id VARCHAR, note VARCHAR, n INTEGER, shard_id INTEGER)")
    for case, plain in (("plain", True), ("hostile", False)):
        chars = alphabet[:5] if plain else alphabet
        ids = {"c" + "".join(rng.choice(chars) for _ in range(rng.randint(0, 5)))
               for _ in range(3000)}
        con.execute("DELETE FROM t")
        con.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", [
            [i, "".join(rng.choice(chars) for _ in range(rng.randint(0, 4))) or None,
             rng.randint(-5, 5), rng.randrange(4)] for i in ids])
        whole = tmp_path / f"{case}_whole.csv"
        con.sql("SELECT * FROM t ORDER BY customer_id").write_csv(str(whole), sep=",", header=True)
        folder = tmp_path / case
        folder.mkdir()
        parts = [export_parts.write_part(
            con, "SELECT * FROM t WHERE shard_id = ? ORDER BY customer_id", ["customer_id", "note"],
            folder, f"4-{k}-x.", params=[k]) for k in range(4)]
        assert all(p.name.endswith(".plain.csv") for p in parts) is plain
        head = export_parts.header(con, "SELECT * FROM t LIMIT 0", tmp_path / "head.csv")
        merged = tmp_path / f"{case}_merged.csv"
        # One round of chunks, and a round per few lines (every cut-off between parts).
        for chunk_bytes in (1 << 17, 40):
            with open(merged, "wb") as out:
                export_parts.merge(head, parts, out, chunk_bytes=chunk_bytes)
            assert merged.read_bytes() == whole.read_bytes()


def test_a_damaged_part_fails_the_merge_and_is_removed(tmp_path):
    """A reused part cut short, out of order, or whose bytes are not the sha256 its name
    records (one byte changed), never goes into an export (glued lines would count right and
    read wrong; out of order would never end): the merge fails and removes it, so that it is
    written again. A part with a repeated id is merged by id."""
    import hashlib
    import io

    import duckdb

    from etl_assets.lib import export_parts

    def part(prefix: str, data: bytes, plain: bool = True, written: bytes | None = None) -> Path:
        """A part named as write_part names it, by the sha256 of `written` (default: `data`)."""
        sha = hashlib.sha256(data if written is None else written).hexdigest()
        path = tmp_path / export_parts.part_name(prefix, sha, plain)
        path.write_bytes(data)
        return path

    good = part("4-0-a.", b"a1,x\nc1,x\n")
    for damaged, problem in [(part("4-1-b.", b"b1,x\nb2,x"), "no line break"),
                             (part("4-2-c.", b"b1,b\nb1,c\nb1,a\n"), "out of order"),
                             (part("4-3-d.", b"b1,x\nb2,x", plain=False), "no line break"),
                             (part("4-1-e.", b"b1,y\n", written=b"b1,x\n"), "sha256"),
                             (part("4-1-f.", b"b1,y\n", plain=False, written=b"b1,x\n"),
                              "sha256")]:
        with pytest.raises(export_parts.PartDamagedError, match=problem) as info:
            export_parts.merge(b"h\n", [good, damaged], io.BytesIO())
        assert info.value.paths == [damaged]
        assert not damaged.exists() and good.exists()

    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT * FROM (VALUES ('b1', 'z'), ('b1', 'y')) v(customer_id, n)")
    written = export_parts.write_part(con, "SELECT * FROM t ORDER BY customer_id", ["n"],
                                      tmp_path, "4-2-e.")
    assert written.name.endswith(".records.csv")
