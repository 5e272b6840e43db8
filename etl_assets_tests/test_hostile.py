"""Hostile input: whatever bytes a supplier sends, the run succeeds with every row accounted
for, or fails with one line; never a traceback, never an export its own checks reject."""

import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl_assets.lib.schema import MAX_FIELD_BYTES, SOURCES
from etl_assets.tools.generate import generate
from etl_assets.tools.runner import run_pipeline
from etl_assets_tests.conftest import examples, make_settings

pytestmark = pytest.mark.usefixtures("dagster_home")


def _insert(data: bytes, at: float, piece: bytes) -> bytes:
    i = int(len(data) * at)
    return data[:i] + piece + data[i:]


def _newlines(data: bytes, at: float, style: bytes) -> bytes:
    """Every other newline from `at` on becomes `style` (CR, CRLF): mixed line endings."""
    i = int(len(data) * at)
    head, tail = data[:i], data[i:].split(b"\n")
    return head + b"".join(line + (style if k % 2 else b"\n") for k, line in
                           enumerate(tail[:-1])) + tail[-1]


def _id_noise(data: bytes, at: float, piece: bytes) -> bytes:
    """Put an invisible or right-to-left character into one customer_id."""
    lines = data.split(b"\n")
    k = 1 + int((len(lines) - 2) * at)
    lines[k] = lines[k].replace(b"cust_", b"cust_" + piece, 1)
    return b"\n".join(lines)


PIECES = st.sampled_from([
    b"\x00", b"\xff\xfe", b"\xc3(", b"\xef\xbb\xbf", b'"', b'",,"', b"\r", b"\r\n",
    ",".join(SOURCES["crm"].column_names).encode() + b"\n",  # a header line mid-file
    b"x" * (MAX_FIELD_BYTES + 1), b"\n,,,\n", b"\xe2\x80\x8b", b"\xe2\x80\x8f",
])
MUTATION = st.one_of(
    st.tuples(st.just(_insert), st.floats(0.05, 1.0), st.one_of(PIECES, st.binary(min_size=1, max_size=40))),
    st.tuples(st.just(_newlines), st.floats(0.05, 0.95), st.sampled_from([b"\r", b"\r\n"])),
    st.tuples(st.just(_id_noise), st.floats(0, 1),
              st.sampled_from([b"\xe2\x80\x8b", b"\xe2\x80\x8f", b"\t", b"\xc2\xa0"])),
)


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory):
    data = tmp_path_factory.mktemp("hostile") / "data"
    generate(40, seed=3, out_dir=data)
    return data


@settings(max_examples=examples(8), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3), target=st.sampled_from(list(SOURCES)))
def test_any_bytes_give_an_accounted_run_or_one_line(tmp_path_factory, small_sample, mutations,
                                                      target):
    base = tmp_path_factory.mktemp("run")
    data = base / "data"
    shutil.copytree(small_sample, data)
    path = data / SOURCES[target].filename
    content = path.read_bytes()
    for mutate, at, piece in mutations:
        content = mutate(content, at, piece)
    path.write_bytes(content)

    s = make_settings(base, data, shard_count=2, max_reject_fraction=1.0)
    outcome = run_pipeline(s, echo=lambda line: None)  # raises nothing, whatever the bytes
    if not outcome.ok:
        assert outcome.reason and "\n" not in outcome.reason, outcome.reason
        assert "Traceback" not in outcome.reason
        # A failed run publishes nothing: this home had no export before.
        assert not (base / "var" / "merged_output.csv").exists(), outcome.reason
        return
    checks = {name: (passed, meta) for name, passed, meta in outcome.checks}
    for name in SOURCES:
        passed, meta = checks[f"{name}.rows_accounted"]
        assert passed and meta["read"] == meta["accepted"] + meta["rejected"], (name, meta)
    assert all(passed for passed, _ in checks.values()), checks
    exported = (base / "var" / "merged_output.csv").read_bytes().count(b"\n")
    assert exported >= 1 + checks["row_count_matches_sources"][1]["table_rows"]
