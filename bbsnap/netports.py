"""Choosing a free 127.0.0.1 port for a server's SSH forward.

A port is free when no other bbsnap server has it recorded (it stays that
server's across restarts) and it can be bound right now.
"""

from __future__ import annotations

import errno
import socket
from typing import Iterable

from .errors import ConflictError, UsageError


def parse_port_range(text: str) -> range:
    try:
        low_text, high_text = text.split("-", 1)
        low, high = int(low_text), int(high_text)
    except ValueError:
        raise UsageError(f"'{text}' is not a port range", hint="e.g. 2222-2999") from None
    if not 1024 <= low <= high <= 65535:
        raise UsageError(f"port range {text} must lie within 1024-65535")
    return range(low, high + 1)


def port_is_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def choose_port(candidates: range, taken: Iterable[int]) -> int:
    reserved = set(taken)
    for port in candidates:
        if port not in reserved and port_is_bindable(port):
            return port
    raise ConflictError(
        f"no free port for the SSH forward in {candidates.start}-{candidates.stop - 1}",
        hint="destroy unused servers or widen ssh_ports (BBSNAP_SSH_PORTS)")
