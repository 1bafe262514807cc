"""The command server's wire format, shared by client and session; built-ins only.

A request is one message on a Unix stream socket: 8 hex digits giving the payload's
length, then the payload, NUL-separated fields (argv and the environment cannot hold a
NUL): kind, package directory, working directory, umask, groups, argc, argv..., then
the environment's KEY=VALUE entries. A `run` request carries the client's standard
input, output and error as SCM_RIGHTS descriptors with its first bytes.

The server's side reads it with bbsnap/cmdserver/request.py. Replies are lines: `pid N`
(the command started in process N: signals go there), `exit N` (its exit status),
`refused WHY` (nothing was run: the client runs the command itself), `info TEXT` (a
ping's answer).
"""

from __future__ import annotations

import os
import sys

HEADER_LEN = 8
MAX_REQUEST = 4 << 20  # an environment larger than this is not a real one
STREAM_FDS = 3


def encode(kind: str, package_dir: str, argv: list[str]) -> bytes:
    """The request of this process (its cwd, umask, groups and environment) for *argv*."""
    umask = os.umask(0o077)
    os.umask(umask)
    fields = [kind, package_dir, os.getcwd(), str(umask),
              ",".join(str(g) for g in sorted(set(os.getgroups()))), str(len(argv)), *argv]
    payload = b"\0".join([*(os.fsencode(f) for f in fields),
                          *(k + b"=" + v for k, v in os.environb.items())])
    return b"%08x" % len(payload) + payload


def fds_message(fds: list[int]) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)


def fds_from(data: bytes) -> list[int]:
    return [int.from_bytes(data[i:i + 4], sys.byteorder, signed=True)
            for i in range(0, len(data) - len(data) % 4, 4)]
