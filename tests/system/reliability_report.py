"""The fault and concurrency tests' figures: one JSON file, by default the fixed
/var/tmp/bbsnap-reliability.json (BBSNAP_RELIABILITY_REPORT moves it).

/var/tmp is shared and sticky, so that name is anyone's to create first. The
report is never opened by name for writing: it is published by rename of a
fresh O_EXCL|O_NOFOLLOW file (bbsnap.safe_files), and a name that is a symlink,
FIFO or the like is refused. An existing report is merged only when it is a
regular file of ours, read without following a symlink or blocking on a FIFO.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from bbsnap import safe_files

REPORT = Path(os.environ.get("BBSNAP_RELIABILITY_REPORT", "/var/tmp/bbsnap-reliability.json"))
MAX_BYTES = 1 << 20
MODE = 0o644  # test figures, not guest data


def read_report(path: Path = REPORT) -> dict[str, Any]:
    """The report so far, or {} when there is none of ours (absent, foreign, not a file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # absent, or a symlink (ELOOP): nothing of ours to merge
        return {}
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return {}
        try:
            data = json.loads(handle.read(MAX_BYTES))
        except ValueError:
            return {}
    return data if isinstance(data, dict) else {}


def write_report(report: dict[str, Any], path: Path = REPORT) -> None:
    """Replace the report, atomically; refused (InvalidInputError) if the name is not a
    regular file: then point BBSNAP_RELIABILITY_REPORT at a directory of your own."""
    safe_files.write_atomic(path, (json.dumps(report, indent=2) + "\n").encode(), MODE)
    print(f"reliability report: {path}")
