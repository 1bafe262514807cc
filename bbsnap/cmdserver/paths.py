"""Where a command server of this install listens, and whether its directory is ours.

Imported by every `bbsnap` start (bbsnap/entry.py): built-in modules only (os, binascii),
no pathlib. The directory is per user ($XDG_RUNTIME_DIR/bbsnap, else /tmp/bbsnap-UID);
the socket's name carries a checksum of this package's directory, so the /opt install and
an editable checkout, both run by one user, each have their own server and never run each
other's code.
"""

from __future__ import annotations

import binascii
import os

from bbsnap.private_dirs import refusal

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def runtime_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if base and os.path.isabs(base):
        return os.path.join(base, "bbsnap")
    return f"/tmp/bbsnap-{os.getuid()}"


def _stem() -> str:
    tag = binascii.crc32(os.fsencode(PACKAGE_DIR)) & 0xFFFFFFFF
    return os.path.join(runtime_dir(), f"command-{tag:08x}")


def socket_path() -> str:
    return _stem() + ".sock"


def lock_path() -> str:
    """Held by the server for its whole life: one server per install and user."""
    return _stem() + ".lock"


def log_path() -> str:
    return _stem() + ".log"


def trusted_runtime_dir() -> bool:
    try:
        return not refusal(os.lstat(runtime_dir()))
    except OSError:
        return False
