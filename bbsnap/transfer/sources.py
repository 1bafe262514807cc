"""Where imported bytes come from: a local path, standard input, or an http(s):// URL.

Opening happens before anything is registered, so a missing path, a directory
or a URL that answers 404 is refused without a trace in the catalogue. The
small documents that travel with an image (a checksum list, the metadata
sidecar ``<SOURCE>.json``) are read from the same kind of place.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import BinaryIO, cast

from bbsnap.lazy_dataclass import dataclass
from bbsnap.transfer import http_source
from bbsnap.transfer import sidecar
from bbsnap.errors import BbsnapError, InvalidInputError, NotFoundError, UsageError

_IMAGE_SUFFIXES = (".gz", ".xz", ".zst", ".zstd", ".bz2", ".qcow2", ".img", ".raw")
DEFAULT_NAME = "Imported image"
_NO_SIDECAR_HINT = "--no-sidecar imports without it"


@dataclass
class OpenedSource:
    stream: BinaryIO
    label: str              # for messages: the path, the URL or "standard input"
    suggested_name: str     # default image name
    size: int | None        # bytes, when known (regular files, Content-Length), for progress

    def close(self) -> None:
        if self.stream is not sys.stdin.buffer:
            self.stream.close()


def open_source(spec: str, stdin: BinaryIO | None = None, *, http_timeout: float = 30.0,
                http_min_rate: int = http_source.DEFAULT_MIN_RATE) -> OpenedSource:
    if spec == "-":
        return OpenedSource(stdin or sys.stdin.buffer, "standard input", DEFAULT_NAME, None)
    if http_source.is_url(spec):
        reader = http_source.open_url(spec, timeout=http_timeout, min_rate=http_min_rate)
        file_name = http_source.file_name(spec)
        # The reader has read(n) and close(), all the pipeline uses of a BinaryIO.
        return OpenedSource(cast(BinaryIO, reader), http_source.display(spec),
                            suggest_name(file_name) if file_name else DEFAULT_NAME, reader.length)
    path = Path(spec)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise NotFoundError(f"{spec}: no such file") from None
    except OSError as exc:
        raise InvalidInputError(f"{spec}: {exc.strerror}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise InvalidInputError(f"{spec} is a directory, not an image file")
    mode = info.st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)):
        raise InvalidInputError(f"{spec} is not a regular file, block device or pipe")
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        raise InvalidInputError(f"{spec} is empty (0 bytes)")
    try:
        stream = open(path, "rb")  # OpenedSource.close() closes it
    except OSError as exc:
        raise InvalidInputError(f"cannot read {spec}: {exc.strerror}") from exc
    size = info.st_size if stat.S_ISREG(info.st_mode) else None
    return OpenedSource(stream, spec, suggest_name(path.name), size)


def source_file_name(spec: str) -> str | None:
    """The name a checksum list would use for *spec* (None for standard input)."""
    if spec == "-":
        return None
    if http_source.is_url(spec):
        return http_source.file_name(spec) or None
    return Path(spec).name or None


def read_document(spec: str, *, what: str, max_bytes: int, http_timeout: float,
                  missing_ok: bool = False) -> bytes | None:
    """A small file from a path or URL, at most *max_bytes*; None if absent and *missing_ok*."""
    if http_source.is_url(spec):
        return http_source.fetch(spec, timeout=http_timeout, max_bytes=max_bytes, what=what,
                                 missing_ok=missing_ok)
    try:
        with open(spec, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise NotFoundError(f"{what} {spec}: no such file") from None
    except OSError as exc:
        raise InvalidInputError(f"cannot read the {what} {spec}: {exc.strerror}") from exc
    if len(data) > max_bytes:
        raise InvalidInputError(f"the {what} {spec} is larger than {max_bytes} bytes")
    return data


def load_sidecar(spec: str, *, http_timeout: float) -> sidecar.Sidecar | None:
    """The metadata sidecar beside *spec* (``<SOURCE>.json``), if there is one."""
    if spec == "-":
        return None
    if http_source.is_url(spec):
        location = http_source.with_suffix(spec, sidecar.SUFFIX)
        label = http_source.display(location)
    else:
        location = label = spec + sidecar.SUFFIX
    try:
        data = read_document(location, what="metadata sidecar", max_bytes=sidecar.MAX_BYTES,
                             http_timeout=http_timeout, missing_ok=True)
        if data is None:
            return None
        return sidecar.parse(data)
    except UsageError:
        raise
    except BbsnapError as exc:
        message = exc.message if label in exc.message else f"{label}: {exc.message}"
        raise type(exc)(message, hint=_NO_SIDECAR_HINT) from None


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
