"""disks/direct_copy.py: a finished file copied from RAM onto the disk, exactly, durably,
and with nothing left behind when a write fails."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from bbsnap.disks import direct_copy

MIB = 1 << 20


def _sparse_source(path: Path) -> bytes:
    """9 MiB + 1000 bytes: data, a 5 MiB hole, data, and a tail not a multiple of 4096."""
    with open(path, "wb") as handle:
        handle.write(os.urandom(3 * MIB + 123))
        handle.seek(8 * MIB)
        handle.write(os.urandom(MIB + 877))
    return path.read_bytes()


@pytest.mark.parametrize("place", ["disk", "ram"])
def test_the_copy_is_the_file_byte_for_byte_its_holes_kept(tmp_path, place):
    source = tmp_path / "copy.qcow2"
    expected = _sparse_source(source)
    if place == "ram":  # a filesystem without O_DIRECT: the buffered way
        out = Path("/dev/shm") / f"bbsnap-test-direct-{os.getpid()}"
        out.mkdir()
    else:
        out = tmp_path / "images"
        out.mkdir()
    try:
        final = out / "img-aaaaa.qcow2"
        direct_copy.publish_from_ram(source, final, mode=0o640)
        assert final.read_bytes() == expected
        assert final.stat().st_mode & 0o777 == 0o640
        assert final.stat().st_blocks * 512 < len(expected), "the hole stayed a hole"
        assert source.read_bytes() == expected, "the source is the caller's to remove"
        assert sorted(p.name for p in out.iterdir()) == ["img-aaaaa.qcow2"]
    finally:
        for path in out.iterdir():
            path.unlink()
        out.rmdir()


def test_a_copy_that_ends_on_a_block_and_an_empty_one(tmp_path):
    for size in (0, 8 * MIB):
        source = tmp_path / f"src-{size}"
        source.write_bytes(os.urandom(size))
        final = tmp_path / f"img-bbbbb-{size}.qcow2"
        direct_copy.publish_from_ram(source, final, mode=0o600)
        assert final.read_bytes() == source.read_bytes()


def test_a_failed_write_leaves_no_partial_and_no_final(tmp_path, monkeypatch):
    source = tmp_path / "copy.qcow2"
    _sparse_source(source)
    final = tmp_path / "img-ccccc.qcow2"

    def disk_full(fd, buffers, offset):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(direct_copy.os, "pwritev", disk_full)
    with pytest.raises(OSError) as raised:
        direct_copy.publish_from_ram(source, final, mode=0o600)
    assert raised.value.errno == errno.ENOSPC
    assert not final.exists() and not direct_copy.partial_of(final).exists()
