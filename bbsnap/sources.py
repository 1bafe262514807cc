"""Where imported bytes come from: a local path or standard input (URLs come later).

Opening happens before anything is registered, so a missing path or a directory
is refused without a trace in the catalogue.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import InvalidInputError, NotFoundError

_IMAGE_SUFFIXES = (".gz", ".xz", ".zst", ".zstd", ".bz2", ".qcow2", ".img", ".raw")


@dataclass
class OpenedSource:
    stream: BinaryIO
    label: str              # for messages: the path or "standard input"
    suggested_name: str     # default image name
    size: int | None        # bytes, when known (regular files), for progress

    def close(self) -> None:
        if self.stream is not sys.stdin.buffer:
            self.stream.close()


def open_source(spec: str, stdin: BinaryIO | None = None) -> OpenedSource:
    if spec == "-":
        return OpenedSource(stdin or sys.stdin.buffer, "standard input", "Imported image", None)
    path = Path(spec)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise NotFoundError(f"{spec}: no such file") from None
    except OSError as exc:
        raise InvalidInputError(f"{spec}: {exc.strerror}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise InvalidInputError(f"{spec} is a directory, not an image file")
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
        raise InvalidInputError(f"{spec} is not a regular file, block device or pipe")
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        raise InvalidInputError(f"{spec} is empty (0 bytes)")
    try:
        stream = open(path, "rb")
    except OSError as exc:
        raise InvalidInputError(f"cannot read {spec}: {exc.strerror}") from exc
    size = info.st_size if stat.S_ISREG(info.st_mode) else None
    return OpenedSource(stream, spec, suggest_name(path.name), size)


def suggest_name(file_name: str) -> str:
    """``debian-12-genericcloud-amd64.qcow2.xz`` -> ``debian-12-genericcloud-amd64``."""
    name = file_name
    changed = True
    while changed:
        changed = False
        for suffix in _IMAGE_SUFFIXES:
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                changed = True
    return name or file_name
