"""disks/writeback.py: the copy is written out while QEMU still writes it (observed with the
kernel's cachestat: its pages leave "dirty", where the kernel alone would keep them dirty
for up to 30 s), a window at a time, never more than DEPTH windows in flight."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time

import pytest

from bbsnap.disks import writeback
from bbsnap.disks.writeback import SYNC_FILE_RANGE_WAIT_BEFORE, Writeback

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


def test_the_file_is_written_out_as_it_grows_and_the_thread_and_descriptors_go(tmp_path):
    target = tmp_path / "copy.qcow2"
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        threads, open_before = threading.active_count(), len(os.listdir("/proc/self/fd"))
        with Writeback([target, tmp_path / "not-there.qcow2"]):  # one it cannot open
            os.write(fd, os.urandom(1 << 20) * 80)  # 80 MiB: several windows
            wait_for(lambda: dirty_pages(fd) == 0, "the first 80 MiB written out")
            os.write(fd, b"more" * 4096)  # QEMU goes on writing: the tail goes out too
            wait_for(lambda: dirty_pages(fd) == 0, "the tail written out")
        assert threading.active_count() == threads, "its thread is joined"
        assert len(os.listdir("/proc/self/fd")) == open_before, "its descriptors closed"
    finally:
        os.close(fd)


def test_at_most_depth_windows_are_in_flight(tmp_path):
    target = tmp_path / "copy.qcow2"
    target.write_bytes(b"\0" * (5 * writeback.WINDOW + 4096))
    calls: list[tuple[int, int, int]] = []
    done = threading.Event()

    def record(_fd: int, offset: int, length: int, flags: int) -> int:
        calls.append((offset, length, flags))
        if offset + length == target.stat().st_size and flags == SYNC_FILE_RANGE_WAIT_BEFORE:
            done.set()
        return 0

    with Writeback([target], call=record):
        assert done.wait(30), calls
    writes = [(o, n) for o, n, f in calls if f == writeback.SYNC_FILE_RANGE_WRITE]
    assert [o for o, _ in writes] == [i * writeback.WINDOW for i in range(6)], "in order"
    assert all(n <= writeback.WINDOW for _, n in writes)
    in_flight = 0
    for _offset, _length, flags in calls:
        in_flight += 1 if flags == writeback.SYNC_FILE_RANGE_WRITE else -1
        assert 0 <= in_flight <= writeback.DEPTH, calls
    assert in_flight == 0, "every window waited for"


def wait_for(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
