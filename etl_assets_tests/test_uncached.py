"""Files written and read around the page cache hold exactly the bytes given, at every size."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from etl_assets.lib import uncached

B = uncached.BLOCK
SIZES = [0, 1, 4095, 4096, 4097, B - 1, B, B + 1, 3 * B + 12345]


def _direct_works(folder: Path) -> bool:
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        return True
    except (OSError, AttributeError):
        return False


@pytest.fixture(params=["direct", "no O_DIRECT"])
def direct(request, monkeypatch) -> bool:
    """Both ways: O_DIRECT where the filesystem takes it, and a system without it."""
    if request.param != "direct":
        monkeypatch.setattr(uncached, "_DIRECT", 0)
    return request.param == "direct"


@pytest.mark.parametrize("size", SIZES)
def test_written_and_read_back_byte_for_byte(tmp_path: Path, size: int, direct: bool):
    rnd = random.Random(size)
    data = rnd.randbytes(size)
    path = tmp_path / "out.bin"
    with uncached.UncachedWriter(path) as out:
        at = 0
        while at < size:  # writes of every size, straddling the blocks
            step = rnd.choice([1, 100, 5000, 1 << 20, B + 7])
            out.write(data[at:at + step])
            at += step
        out.finish()
    assert path.read_bytes() == data
    # Whole blocks (and an aligned tail) went around the page cache wherever the filesystem
    # takes O_DIRECT.
    tail = size % B
    whole = size - tail + (0 if tail % 4096 else tail)
    assert out.direct_bytes == (whole if direct and _direct_works(tmp_path) else 0)
    assert b"".join(bytes(view) for view in uncached.blocks(path)) == data
    assert uncached.sha256(path) == hashlib.sha256(data).hexdigest()


def test_a_reader_stopped_early_closes_its_file(tmp_path: Path):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(3 * B))
    before = len(os.listdir("/proc/self/fd"))
    reader = uncached.blocks(path)
    assert len(next(reader)) == B
    reader.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_full_disk_is_raised_to_the_writer_not_lost_in_its_thread():
    """/dev/full refuses every write with ENOSPC, as a full disk does."""
    import errno

    out = uncached.UncachedWriter("/dev/full")
    with pytest.raises(OSError) as raised, out:
        for _ in range(4):  # more blocks than buffers: a later hand-off sees the error
            out.write(b"x" * B)
        out.finish()
    assert raised.value.errno == errno.ENOSPC


def test_a_new_file_gets_the_mode_open_gives(tmp_path: Path):
    old = os.umask(0o002)
    try:
        with uncached.UncachedWriter(tmp_path / "new.bin") as out:
            out.finish()
        with open(tmp_path / "reference.bin", "wb"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "new.bin").stat().st_mode == (tmp_path / "reference.bin").stat().st_mode
