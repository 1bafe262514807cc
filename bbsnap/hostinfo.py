"""Facts about the host that server creation checks against."""

from __future__ import annotations

import glob
import os
from pathlib import Path


def total_memory_mib() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def default_ssh_public_keys() -> list[Path]:
    """The user's ``~/.ssh/*.pub`` (as cloud tools default to)."""
    home = Path(os.path.expanduser("~"))
    return [Path(p) for p in sorted(glob.glob(str(home / ".ssh" / "*.pub")))]
