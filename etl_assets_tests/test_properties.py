"""Property tests: random small datasets with duplicates, gaps, bad rows and shuffled order."""

import random
import shutil
import unicodedata

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl_assets.lib.schema import SOURCES
from etl_assets.lib.sources import stage_source
from etl_assets_tests.conftest import build_profiles, examples, make_settings, write_sources

POOL = [f"c{i:02d}" for i in range(12)]
# One typed column per source that the generated rows may break, with a good and a bad value.
BREAKABLE = {"crm": ("employee_count", "12", "twelve"), "billing": ("plan", "starter", "gold"),
             "product": ("usage_pct", "55.5", "155"), "support": ("nps_score", "7", "11")}

row = st.tuples(st.sampled_from(POOL + ["", " "]), st.booleans(), st.integers(0, 9))
dataset = st.fixed_dictionaries({name: st.lists(row, min_size=1, max_size=14) for name in SOURCES})


def _rows(data):
    out = {}
    for name, rows in data.items():
        column, good, bad = BREAKABLE[name]
        out[name] = [{"customer_id": cid, "email": f"{name}{n}@x", column: bad if broken else good}
                     for cid, broken, n in rows]
    return out


def _shuffle_keeping_duplicate_order(rows, seed):
    """Shuffle rows; rows sharing an id keep their relative order (last-row-wins stays put)."""
    rng = random.Random(seed)
    slots = list(range(len(rows)))
    rng.shuffle(slots)
    shuffled = [rows[i] for i in slots]
    by_id = {}
    for r in rows:
        by_id.setdefault(r["customer_id"].strip(), []).append(r)
    cursor = {k: iter(v) for k, v in by_id.items()}
    return [next(cursor[r["customer_id"].strip()]) for r in shuffled]


def _oracle(rows):
    """Ids with at least one valid row anywhere, and per source the valid rows that win."""
    winners = {}
    for name, source_rows in rows.items():
        column, good, _ = BREAKABLE[name]
        for r in source_rows:
            if r["customer_id"].strip() and r[column] == good:
                winners.setdefault(name, {})[r["customer_id"].strip()] = r["email"]
    return winners


@settings(max_examples=examples(12), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=dataset, seed=st.integers(0, 10**6))
def test_exactly_one_row_per_valid_customer_whatever_the_layout(tmp_path_factory, data, seed):
    base = tmp_path_factory.mktemp("prop")
    rows = _rows(data)
    winners = _oracle(rows)
    expected_ids = sorted(set().union(*[set(w) for w in winners.values()]) if winners else set())

    results = []
    for n, shuffled in ((1, False), (3, True)):
        work = base / f"n{n}"
        source_rows = ({k: _shuffle_keeping_duplicate_order(v, seed) for k, v in rows.items()}
                       if shuffled else rows)
        data_dir = write_sources(work / "data", source_rows)
        s = make_settings(work, data_dir, shard_count=n, max_reject_fraction=1.0)
        for name, schema in SOURCES.items():
            report = stage_source(schema, s).report
            assert report.rows_read == len(rows[name]) == report.accepted + report.rejected
            assert report.accepted == len(winners.get(name, {}))
        profiles = build_profiles(s)
        assert sorted(profiles) == expected_ids
        results.append({cid: {k: v for k, v in p.items() if k != "shard_id"}
                        for cid, p in profiles.items()})
        shutil.rmtree(work)
    assert results[0] == results[1]
    for cid, profile in results[0].items():
        # The email comes from the winning (last valid) row of the first source that has one.
        first = next(w[cid] for name in ("crm", "billing", "product", "support")
                     if cid in (w := winners.get(name, {})))
        assert profile["email"] == first


# Ids that print alike: a clean base id, padded at the ends with whitespace, and with an
# invisible or space-like character (control, format, separator or any space) inserted, or put
# in place of the plain space ("c\u00a01" prints as "c 1").
BASES = ["c1", "c 1"]
WHITESPACE = [chr(c) for c in range(0x3001) if chr(c).isspace()]
ODD = st.one_of(st.sampled_from(["\t", "\u200b", "\ufeff", "\u200f", "\u00a0", "\u2003"]),
                st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]))


def printed(customer_id: str) -> str:
    """What a reader sees: ends trimmed, invisible characters gone, every space a plain one."""
    shown = (" " if unicodedata.category(ch) == "Zs" else
             "" if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch
             for ch in customer_id.strip())
    return "".join(shown).strip()


@st.composite
def lookalike(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from(BASES))
    pad = st.text(st.sampled_from(WHITESPACE), max_size=2)
    change = draw(st.sampled_from(["none", "insert", "replace"]))
    if change == "insert":
        at = draw(st.integers(0, len(base)))
        base = base[:at] + draw(ODD) + base[at:]
    elif change == "replace":
        base = base.replace(" ", draw(ODD))
    return draw(pad) + base + draw(pad)


@settings(max_examples=examples(12), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.fixed_dictionaries({name: st.lists(lookalike(), min_size=1, max_size=4)
                                  for name in SOURCES}))
def test_ids_that_print_the_same_are_never_two_profiles(tmp_path_factory, ids):
    work = tmp_path_factory.mktemp("ids")
    rows = {name: [{"customer_id": cid, "email": f"{name}{i}@x"} for i, cid in enumerate(cids)]
            for name, cids in ids.items()}
    s = make_settings(work, write_sources(work / "data", rows), shard_count=3,
                      max_reject_fraction=1.0)
    profiles = build_profiles(s)
    # Either merged into one customer or the odd one rejected: one profile per printed form.
    by_print = {}
    for cid in profiles:
        by_print.setdefault(printed(cid), []).append(cid)
    assert all(len(group) == 1 for group in by_print.values()), by_print
    # Nothing is lost on the way: an id already clean once trimmed is always a profile.
    clean = {cid.strip() for cids in ids.values() for cid in cids if cid.strip() in BASES}
    assert clean <= set(profiles)
    shutil.rmtree(work)
