"""Validation of user-supplied image fields, shared by import and update.

Names and descriptions are free text, stored and shown verbatim (any of
``<>&'"``, newlines, ``../``): they never become paths, shell words or XML text
unescaped, so only length and NUL bytes are limited. Fields that can reach a
guest or a domain definition (arch, username) are strictly shaped.
"""

from __future__ import annotations

import platform
import re

from bbsnap.errors import UsageError
from bbsnap.vocabulary import Firmware, values

MAX_NAME = 255
MAX_DESCRIPTION = 4096
_ARCH = re.compile(r"^[A-Za-z0-9_]{1,32}$")
_USERNAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def host_arch() -> str:
    return platform.machine() or "x86_64"


def _check_utf8(text: str, what: str, hint: str) -> None:
    """Text with surrogate escapes (undecodable bytes of a file name, argv or a sidecar's
    "\\udcff") cannot be stored in SQLite: refused here, before any row or file exists."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} must be valid UTF-8 text, not {text!r}", hint=hint) from None


def check_name(name: str) -> str:
    if not name.strip():
        raise UsageError("an image name must not be empty")
    _check_utf8(name, "an image name",
                "a file name that is not UTF-8 gives no name: give one with -n/--name")
    if len(name) > MAX_NAME or "\x00" in name:
        raise UsageError(f"an image name must be at most {MAX_NAME} characters, without NUL")
    return name


def check_description(text: str) -> str:
    _check_utf8(text, "a description", "give it as UTF-8 text")
    if len(text) > MAX_DESCRIPTION or "\x00" in text:
        raise UsageError(f"a description must be at most {MAX_DESCRIPTION} characters, without NUL")
    return text


def check_arch(arch: str) -> str:
    if not _ARCH.fullmatch(arch):
        raise UsageError(f"'{arch}' is not an architecture name", hint="e.g. x86_64, aarch64, i686")
    return arch


def check_username(username: str) -> str:
    if not _USERNAME.fullmatch(username):
        raise UsageError(f"'{username}' is not a valid login name",
                         hint="lowercase letters, digits, '_' and '-', starting with a letter")
    return username


FIRMWARES = values(Firmware)


def check_firmware(firmware: str) -> str:
    """How a guest boots: the image's disk must carry a boot loader for it."""
    if firmware not in FIRMWARES:
        raise UsageError(f"'{firmware}' is not a firmware bbsnap boots",
                         hint=f"one of {', '.join(FIRMWARES)}")
    return firmware


def check_min_ram(mib: int) -> int:
    if mib <= 0 or mib > 16 * 1024 * 1024:
        raise UsageError(f"minimum RAM must be a positive number of MiB, not {mib}")
    return mib
