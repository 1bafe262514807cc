"""Which libvirt connection and domain a server directory belongs to.

`servers create` writes ``origin.json`` into the server's directory once its domain is
defined. Without it, `doctor` pointed at another connection (``-c test:///default``, a
leftover ``LIBVIRT_DEFAULT_URI``, a session URI) sees no domain of that name and would take
a live server's disks for orphans: with it, another connection's directory is undecidable.
"""

from __future__ import annotations

import json
from pathlib import Path

from bbsnap import safe_files
from bbsnap.lazy_dataclass import dataclass

ORIGIN_FILE = "origin.json"
ORIGIN_MODE = 0o600


@dataclass(frozen=True)
class Origin:
    connect: str       # the libvirt URI the server was created on
    domain_uuid: str


def write_origin(directory: Path, connect: str, domain_uuid: str) -> Path:
    """Record *directory*'s connection and domain atomically (temporary name, fsync, rename)."""
    final = directory / ORIGIN_FILE
    data = json.dumps({"connect": connect, "domain_uuid": domain_uuid}, sort_keys=True)
    safe_files.write_atomic(final, (data + "\n").encode(), ORIGIN_MODE)
    return final


def read_origin(directory: Path) -> Origin | None:
    """The recorded origin, or None (made before bbsnap recorded it, or unreadable)."""
    try:
        data = json.loads((directory / ORIGIN_FILE).read_text())
        return Origin(str(data["connect"]), str(data["domain_uuid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
