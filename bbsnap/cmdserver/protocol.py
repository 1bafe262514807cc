"""The command server's wire format, shared by client and session; built-ins only.

A request is one message on a Unix stream socket: 8 hex digits giving the payload's
length, then the payload, NUL-separated fields (argv and the environment cannot hold a
NUL): kind, package directory, working directory, umask, groups, argc, argv..., then
the environment's KEY=VALUE entries. A `run` request carries the client's standard
input, output and error as SCM_RIGHTS descriptors with its first bytes.

Replies are lines: `pid N` (the command started in process N: signals go there),
`exit N` (its exit status), `refused WHY` (nothing was run: the client runs the command
itself), `info TEXT` (a ping's answer).
"""

from __future__ import annotations

import os
import sys

HEADER_LEN = 8
MAX_REQUEST = 4 << 20  # an environment larger than this is not a real one
STREAM_FDS = 3


class Request:
    """A decoded request. A plain class: `dataclasses` costs 12 ms to import, and the
    client, which imports this module on every `bbsnap` start, must stay near the
    interpreter's own start-up."""

    __slots__ = ("kind", "package_dir", "cwd", "umask", "groups", "argv", "environ")

    def __init__(self, *, kind: str, package_dir: str, cwd: str, umask: int,
                 groups: tuple[int, ...], argv: tuple[str, ...],
                 environ: tuple[tuple[str, str], ...]) -> None:
        self.kind = kind  # "run", "ping" or "stop"
        self.package_dir = package_dir
        self.cwd = cwd
        self.umask = umask
        self.groups = groups
        self.argv = argv
        self.environ = environ


def encode(kind: str, package_dir: str, argv: list[str]) -> bytes:
    """The request of this process (its cwd, umask, groups and environment) for *argv*."""
    umask = os.umask(0o077)
    os.umask(umask)
    fields = [kind, package_dir, os.getcwd(), str(umask),
              ",".join(str(g) for g in sorted(set(os.getgroups()))), str(len(argv)), *argv]
    payload = b"\0".join([*(os.fsencode(f) for f in fields),
                          *(k + b"=" + v for k, v in os.environb.items())])
    return b"%08x" % len(payload) + payload


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


def fds_message(fds: list[int]) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)


def fds_from(data: bytes) -> list[int]:
    return [int.from_bytes(data[i:i + 4], sys.byteorder, signed=True)
            for i in range(0, len(data) - len(data) % 4, 4)]
