"""disks/image_lock.py against locks taken as QEMU takes them (OFD locks on its bytes)."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest

from bbsnap.disks import image_lock


def _lock(path: Path, *offsets: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    for offset in offsets:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                    struct.pack("hhqqi", fcntl.F_RDLCK, os.SEEK_SET, offset, 1, 0))
    return fd


@pytest.mark.parametrize("bytes_held, writing", [
    ((100, 101, 103, 201, 203), True),   # a running guest's writable disk
    ((100,), False),                     # the same disk once QEMU inactivated it
    ((101,), True), ((201,), True),
    ((), False),
])
def test_the_write_locks_tell(tmp_path, bytes_held, writing):
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"\0" * 4096)
    fd = _lock(image, *bytes_held)
    try:
        assert image_lock.held_for_writing(image) is writing
    finally:
        os.close(fd)
    assert image_lock.held_for_writing(image) is False, "the lock went with its holder"


def test_a_file_that_cannot_be_opened_is_not_held(tmp_path):
    assert image_lock.held_for_writing(tmp_path / "missing.qcow2") is False
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    assert image_lock.held_for_writing(link) is False
