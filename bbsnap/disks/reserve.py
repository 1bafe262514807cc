"""Reserve a growing file's blocks before another process writes it, and give back the rest.

Why: QEMU's backup job appends the copy's clusters to its qcow2 target. On ext4 each new
block is allocated only when the kernel writes the page out (delayed allocation), inside
the journal transaction that QEMU's flushes of the target (and any other file's fsync) then
wait on. Blocks reserved beforehand beyond the file's end (``fallocate`` with
FALLOC_FL_KEEP_SIZE: the file's size, so what qcow2 sees, stays as it is) are allocated
already, and the copy is written into them. Measured with a bare blockdev-backup of an
8 GiB disk holding 1 GiB (QEMU 7.2, TCG): the job 1.03-1.10 s with the target's blocks
reserved against 1.25-1.29 s, and 0.47-0.49 s against 0.76-0.95 s with its L2 tables made
first as well (qemu_img.map_as_zero).

The reservation is a guess (the source file's allocated bytes); what the copy did not use
is released before the copy is published (:func:`release`), and a reservation is made only
when the filesystem keeps its free-space reserve beside it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from bbsnap import proc
from bbsnap.free_space import free_space_reserve

FALLOC_FL_KEEP_SIZE = 1


def _fallocate() -> Callable[..., Any] | None:
    import ctypes  # here: ~2 ms of every snapshot command's start-up, needed by full copies

    try:
        function = proc.libc().fallocate
    except (OSError, AttributeError):
        return None  # not Linux: the copy allocates as it goes
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    call: Callable[..., Any] = function
    return call


def reserve(path: Path, nbytes: int) -> bool:
    """Reserve *nbytes* of blocks past the end of *path*, its size unchanged; False (and
    nothing reserved) when the filesystem cannot, or would keep less than its free-space
    reserve beside them."""
    call = _fallocate()
    if call is None or nbytes <= 0:
        return False
    try:
        available, keep_free = free_space_reserve(path.parent)
    except OSError:
        return False
    if available - nbytes < keep_free:
        return False
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return bool(call(fd, FALLOC_FL_KEEP_SIZE, os.fstat(fd).st_size, nbytes) == 0)
    finally:
        os.close(fd)


def release(path: Path) -> None:
    """Give back the blocks reserved past the end of *path* that nothing was written into:
    a truncation to its own size frees them (ext4, XFS, tmpfs)."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
