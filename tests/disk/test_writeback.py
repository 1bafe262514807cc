"""disks/writeback.py: the copy's dirty pages are sent to the disk while QEMU still writes
it (observed with the kernel's cachestat: the pages leave "dirty" for "writeback" at once,
where the kernel alone would keep them dirty for up to 30 s)."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from bbsnap.disks.writeback import Writeback

SYS_CACHESTAT = 451  # x86_64, Linux >= 6.5


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def dirty_pages(fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    stat = _Stat()
    if libc.syscall(SYS_CACHESTAT, fd, ctypes.byref(_Range(0, 0)), ctypes.byref(stat), 0):
        code = ctypes.get_errno()
        if code == errno.ENOSYS:
            pytest.skip("this kernel has no cachestat to observe the page cache with")
        raise OSError(code, os.strerror(code))
    return int(stat.dirty)


def test_kick_sends_every_dirty_page_of_the_file_to_the_disk(tmp_path):
    target = tmp_path / "copy.qcow2"
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, os.urandom(1 << 20) * 32)  # 32 MiB, in the page cache only
        assert dirty_pages(fd) > 0
        open_before = len(os.listdir("/proc/self/fd"))
        writeback = Writeback([target, tmp_path / "not-there.qcow2"])  # one it cannot open
        writeback.kick()
        assert dirty_pages(fd) == 0, "every dirty page is under writeback (or written)"
        os.write(fd, b"more" * 4096)  # QEMU goes on writing: the next kick takes those too
        assert dirty_pages(fd) > 0
        writeback.kick()
        assert dirty_pages(fd) == 0
        writeback.close()
        assert len(os.listdir("/proc/self/fd")) == open_before, "its descriptors are closed"
    finally:
        os.close(fd)
