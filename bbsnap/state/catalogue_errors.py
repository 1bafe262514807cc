"""What a failed SQLite call on the catalogue means to the user, and what to do about it.

sqlite3 reports every problem as DatabaseError/OperationalError with SQLite's own words
("database disk image is malformed", "attempt to write a readonly database"); its extended
result code (``sqlite_errorname``, Python 3.11+) says which problem it is. Used where the
catalogue opens and begins transactions, and by the CLI's catch point for everything else.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from bbsnap.errors import CatalogueError

# (prefix of SQLite's error name, what failed, what to do next)
_KINDS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("SQLITE_CORRUPT", "SQLITE_NOTADB"), "the catalogue {path} is damaged: {detail}",
     "restore it from a backup; the image files themselves are in images/"),
    (("SQLITE_READONLY",), "cannot write the catalogue {path}: read-only ({detail})",
     "bbsnap writes the file and its -wal and -shm files beside it: check the permissions, "
     "attributes and mount of both the file and its directory"),
    (("SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH"),
     "cannot open the catalogue {path}: {detail}",
     "check that its directory exists and that you may write there"),
    (("SQLITE_FULL",), "the catalogue {path} cannot grow: {detail}",
     "free space on its file system"),
    (("SQLITE_IOERR",), "cannot read or write the catalogue {path}: {detail}",
     "check the disk (dmesg) and its file system"),
    (("SQLITE_BUSY", "SQLITE_LOCKED"), "the catalogue {path} is busy: {detail}",
     "another bbsnap command holds it; retry when it has finished"),
)


def catalogue_failure(exc: sqlite3.Error, path: Path | None) -> CatalogueError:
    """A CatalogueError saying what *exc* means for the catalogue at *path*."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    shown = _shown(path) if path is not None else "(path unknown)"
    detail = " ".join(str(exc).split()) or type(exc).__name__
    for prefixes, message, hint in _KINDS:
        if name.startswith(prefixes):
            return CatalogueError(message.format(path=shown, detail=detail), hint=hint)
    return CatalogueError(f"the catalogue {shown} failed: {detail}",
                          hint="'bbsnap doctor' checks the data directory")


def _shown(path: Path) -> str:
    """Undecodable bytes and control characters escaped: printing it must not fail."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
