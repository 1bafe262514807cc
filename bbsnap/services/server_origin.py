"""Which libvirt connection and domain a server directory belongs to.

`servers create` writes ``origin.json`` into the server's directory once its domain is
defined. Without it, `doctor` pointed at another connection (``-c test:///default``, a
leftover ``LIBVIRT_DEFAULT_URI``, a session URI) sees no domain of that name and would take
a live server's disks for orphans: with it, another connection's directory is undecidable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ORIGIN_FILE = "origin.json"
ORIGIN_MODE = 0o600


@dataclass(frozen=True)
class Origin:
    connect: str       # the libvirt URI the server was created on
    domain_uuid: str


def write_origin(directory: Path, connect: str, domain_uuid: str) -> Path:
    """Record *directory*'s connection and domain atomically (temporary name, fsync, rename)."""
    final = directory / ORIGIN_FILE
    temporary = directory / f".{ORIGIN_FILE}.{os.getpid()}"
    data = json.dumps({"connect": connect, "domain_uuid": domain_uuid}, sort_keys=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, ORIGIN_MODE)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(data + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def read_origin(directory: Path) -> Origin | None:
    """The recorded origin, or None (made before bbsnap recorded it, or unreadable)."""
    try:
        data = json.loads((directory / ORIGIN_FILE).read_text())
        return Origin(str(data["connect"]), str(data["domain_uuid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
