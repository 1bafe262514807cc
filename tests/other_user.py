"""What another local user (``nobody``) can do with bbsnap's files: a real second process.

The probe runs under ``runuser -u nobody`` with no repository code, so it sees exactly what
the kernel lets that user see: it tries to open each path for reading (and, for a lock file,
to take an flock on it) and to list each directory.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

# The system's interpreter: the test run's own may live where nobody may not go (/root).
PYTHON = "/usr/bin/python3"

PROBE = r"""
import fcntl, json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path):
            os.listdir(path)
            out[path] = "listed"
        else:
            fd = os.open(path, os.O_RDONLY)
            os.read(fd, 16)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            out[path] = "read"
    except OSError as exc:
        out[path] = "denied" if exc.errno in (1, 13) else f"error {exc.errno}"
print(json.dumps(out))
"""


def as_nobody(paths: list[Path]) -> dict[Path, str]:
    """For each path: "read"/"listed" if nobody got in, "denied" if the kernel refused."""
    for path in paths:
        assert path.exists(), f"{path} should exist for the probe to mean anything"
    done = subprocess.run(["runuser", "-u", "nobody", "--", PYTHON, "-I", "-c", PROBE,
                           *map(str, paths)], capture_output=True, text=True, check=True,
                          timeout=60, cwd="/")
    return {Path(k): v for k, v in json.loads(done.stdout).items()}


def readable_by_nobody(paths: list[Path]) -> list[Path]:
    return [path for path, verdict in as_nobody(paths).items() if verdict != "denied"]
