"""A command request as the server's spare reads it (the format: protocol.py)."""

from __future__ import annotations

import os

from bbsnap.cmdserver.protocol import HEADER_LEN, MAX_REQUEST
from bbsnap.lazy_dataclass import dataclass


@dataclass(frozen=True)
class Request:
    kind: str  # "run", "ping" or "stop"
    package_dir: str
    cwd: str
    umask: int
    groups: tuple[int, ...]
    argv: tuple[str, ...]
    environ: tuple[tuple[str, str], ...]


def payload_length(header: bytes) -> int:
    """The payload length a request's header announces; ValueError if it is not one."""
    if len(header) != HEADER_LEN or not all(c in b"0123456789abcdef" for c in header):
        raise ValueError("not a bbsnap command request")
    length = int(header, 16)
    if length > MAX_REQUEST:
        raise ValueError("request too large")
    return length


def decode(payload: bytes) -> Request:
    """ValueError on anything but a well-formed request."""
    parts = [os.fsdecode(p) for p in payload.split(b"\0")]
    if len(parts) < 6:
        raise ValueError("truncated request")
    kind, package_dir, cwd, umask, groups, argc = parts[:6]
    count = int(argc)
    if kind not in ("run", "ping", "stop") or count < 0 or len(parts) < 6 + count:
        raise ValueError("malformed request")
    argv = tuple(parts[6:6 + count])
    environ = []
    for entry in parts[6 + count:]:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise ValueError("malformed environment entry")
        environ.append((key, value))
    return Request(kind=kind, package_dir=package_dir, cwd=cwd, umask=int(umask, 10) & 0o777,
                   groups=tuple(int(g) for g in groups.split(",") if g),
                   argv=argv, environ=tuple(environ))
