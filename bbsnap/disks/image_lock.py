"""Whether a QEMU holds a disk image for writing, read from the image locks it takes.

QEMU (file-posix "image locking", on by default since 2.10) holds open-file-description
(OFD) locks on bytes of every image it has open: a shared lock at byte 100 + n for each
block permission n it uses, and at byte 200 + n for each it does not let others take.
A guest's writable disk: 100, 101 (write), 103 (resize), 201 (no other writer), 203.
``qemu-img`` takes the same locks and refuses to write an image whose bytes conflict. A
QEMU that *inactivates* its disks (at the end of a migration's final pass, a memory
save's included) keeps only byte 100 (consistent read): measured here on QEMU 7.2,
during a live memory save of an idle domain, 101/103/201/203 went 14 ms before libvirt's
save call returned (scripts/bench_memory.py prints the same on the tiny guest).

:func:`held_for_writing` asks the kernel (``F_OFD_GETLK``) about bytes 101 and 201
without taking a lock: microseconds, so it can be polled every millisecond, where a
``qemu-img`` start costs ~11 ms. It cannot see a QEMU running with locking off or a
filesystem without OFD locks: callers must have seen it true before relying on a false.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

PERM_BASE, SHARED_BASE = 100, 200  # QEMU's RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE
WRITE = 1  # BLK_PERM_WRITE's bit
_FLOCK = "hhqqi"  # struct flock: l_type, l_whence, l_start, l_len, l_pid (native alignment)


def held_for_writing(path: Path) -> bool:
    """True if some process holds the write permission of *path* or forbids others it
    (QEMU's bytes 101 and 201); False if none does or the file cannot be asked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        # Closing this fd drops no lock of QEMU's: OFD locks belong to their own open file
        # description, and this process holds no POSIX lock that a close would release.
        return any(_locked(fd, base + WRITE) for base in (PERM_BASE, SHARED_BASE))
    except OSError:
        return False
    finally:
        os.close(fd)


def _locked(fd: int, byte: int) -> bool:
    probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    kind: int = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0]
    return kind != fcntl.F_UNLCK
