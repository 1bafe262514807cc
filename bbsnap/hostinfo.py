"""Facts about the host that server creation checks against."""

from __future__ import annotations

import glob
import os
from pathlib import Path


def total_memory_mib() -> int:
    return _meminfo_kib("MemTotal") // 1024


def available_memory_bytes() -> int:
    """What the kernel says can be had without swapping (MemAvailable); 0 if unreadable."""
    try:
        return _meminfo_kib("MemAvailable") * 1024
    except (OSError, ValueError, IndexError):
        return 0


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def default_ssh_public_keys() -> list[Path]:
    """The user's ``~/.ssh/*.pub`` (as cloud tools default to)."""
    home = Path(os.path.expanduser("~"))
    return [Path(p) for p in sorted(glob.glob(str(home / ".ssh" / "*.pub")))]
