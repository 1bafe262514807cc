"""Free space on the data directory's filesystem, and the reserve bbsnap leaves there.

A module of its own (it needs only ``os``): a snapshot command asks it whether QEMU's copy
fits in RAM, and importing it from transfer/stream.py brought hashlib and the compressors
along (~5 ms of that command's start-up here).
"""

from __future__ import annotations

import os
from pathlib import Path

from bbsnap.errors import BbsnapError

# Free space left on the data directory's filesystem after an import: the catalogue, the
# guests' overlays and the rest of the host live there too.
FREE_SPACE_RESERVE_MIN = 1 << 30
FREE_SPACE_RESERVE_FRACTION = 0.05


def free_space_reserve(directory: Path) -> tuple[int, int]:
    """(bytes available to us, bytes to leave free) on *directory*'s filesystem."""
    stats = os.statvfs(directory)
    total = stats.f_blocks * stats.f_frsize
    reserve = max(FREE_SPACE_RESERVE_MIN, int(total * FREE_SPACE_RESERVE_FRACTION))
    return stats.f_bavail * stats.f_frsize, reserve


def spare_bytes(directory: Path) -> int:
    """Bytes *directory*'s filesystem can take beyond its free-space reserve (0 when it
    cannot be asked)."""
    try:
        available, reserve = free_space_reserve(directory)
    except OSError:
        return 0
    return available - reserve


def check_free_space(directory: Path, needed: int = 0) -> None:
    """Refuse to go on if writing *needed* more bytes would eat into the reserve."""
    available, reserve = free_space_reserve(directory)
    if available - needed < reserve:
        shortfall = f" ({needed} more bytes needed)" if needed else ""
        raise BbsnapError(
            f"not enough free space in {directory}: {available} bytes left{shortfall}, and "
            f"bbsnap keeps {reserve} bytes free; nothing was imported",
            hint="free some space or move the data directory (BBSNAP_HOME)")
