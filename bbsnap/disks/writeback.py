"""Write a file out to disk behind the process filling it, a little at a time.

Why write it out at all: the snapshot's copy must be on disk before the image turns
available, and QEMU's backup job flushes its target when it ends. With the kernel's default
thresholds (background writeback at 10 % of RAM, or after 30 s) a 1 GiB copy stays in the
page cache until that flush, which then writes the whole GiB after the copy: measured here
(QEMU 7.2, TCG guest, 8 GiB disk holding 1 GiB), the job took 1.2-2.3 s, median 1.64 s,
against 0.93-1.33 s, median 1.01 s, when the worker asked for writeback of everything dirty
every 50 ms while the job ran.

Why a little at a time: everything dirty sent at once fills the disk's queue (256 requests
of up to 4 MiB here), and every fsync on the filesystem waits behind it — the guest's own
flushes of its disk included (scripts/bench_guest_view.py, the 8 GiB full copy: the guest's
longest write gap 725-828 ms, the host's fdatasync probe 577 ms). So a thread writes the
file out in WINDOW-sized pieces as it grows, at most DEPTH of them in flight
(``sync_file_range`` WRITE, then WAIT_BEFORE on the oldest): the guest's longest gap became
297-380 ms, the host probe's 136-143 ms, and the copy was available sooner (+1.08-1.28 s
after the command's start against +1.63 s). What the copy still has dirty when the job ends
QEMU's own flush writes at once; that is the gap left.

A standalone full copy QEMU writes into RAM instead (services/snapshots/targets.py) needs
none of this: disks/direct_copy.py puts it on the disk after the job, a few MiB at a time.

Durability does not depend on this: it is still the job's own flush and the fsync before the
rename (safe_files.publish) that make the copy durable.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Any, Callable

from bbsnap import proc

SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
WINDOW = 32 << 20  # bytes sent to the disk at a time
DEPTH = 2          # windows in flight at once: the oldest is waited for before another
IDLE = 0.005       # seconds between looks at files that did not grow


def _sync_file_range() -> Callable[..., Any] | None:
    try:
        function = proc.libc().sync_file_range
    except (OSError, AttributeError):
        return None  # not Linux / no such libc call: the final flush does it all
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    call: Callable[..., Any] = function
    return call


class Writeback:
    """While open (a context manager), a thread writes *paths* out behind their writer.

    A file that cannot be opened (e.g. one libvirt handed to QEMU's user for the job) is
    left to the final flush. ctypes lets go of the GIL during each call, so the thread
    does not hold up the worker's polling. Leaving joins the thread: none outlives it."""

    def __init__(self, paths: list[Path], *,
                 call: Callable[[int, int, int, int], Any] | None = None) -> None:
        self._paths = paths
        self._call = call or _sync_file_range()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Writeback":
        if self._call is not None:
            self._thread = threading.Thread(target=self._run, name="writeback", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        call = self._call
        assert call is not None
        fds: dict[Path, int] = {}
        unreadable: set[Path] = set()                   # tried once: not ours for this job
        sent: dict[Path, int] = {}                      # how far each file was sent
        in_flight: list[tuple[int, int, int]] = []      # (fd, offset, length), oldest first
        try:
            while not self._stop.is_set():
                moved = False
                for path in self._paths:
                    fd = fds.get(path)
                    if fd is None:
                        if path in unreadable:
                            continue
                        try:
                            fd = fds[path] = os.open(path, os.O_RDONLY | os.O_NOFOLLOW
                                                     | os.O_CLOEXEC)
                        except OSError:
                            # QEMU's user's for the job (a normal user on qemu:///system):
                            # left to the final flush, not tried again every IDLE.
                            unreadable.add(path)
                            continue
                    size, start = os.fstat(fd).st_size, sent.get(path, 0)
                    # A whole window, or the tail once nothing else is in flight.
                    if size - start >= WINDOW or (size > start and not in_flight):
                        end = min(size, start + WINDOW)
                        call(fd, start, end - start, SYNC_FILE_RANGE_WRITE)
                        in_flight.append((fd, start, end - start))
                        sent[path] = end
                        moved = True
                while len(in_flight) > (DEPTH - 1 if moved else 0):
                    fd, start, length = in_flight.pop(0)
                    call(fd, start, length, SYNC_FILE_RANGE_WAIT_BEFORE)
                if not moved:
                    self._stop.wait(IDLE)
        finally:
            for fd in fds.values():
                os.close(fd)
