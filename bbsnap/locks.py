"""Per-server locks: one bbsnap operation on a server at a time.

libvirt blocks a second job on a domain (for up to 30 s, then fails), so bbsnap
serialises its own operations per domain with an flock on
``DATA/locks/<domain uuid>.lock``. A snapshot's background worker inherits the
open lock from the command that started it, so the lock is held until the copy
is finished, and is released by the kernel if the worker dies.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ConflictError


@dataclass
class ServerLock:
    fd: int
    path: Path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing our descriptor drops the lock unless a child shares it
            self.fd = -1

    def __enter__(self) -> "ServerLock":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def lock_path(locks_dir: Path, domain_uuid: str) -> Path:
    return locks_dir / f"{domain_uuid}.lock"


def acquire(locks_dir: Path, domain_uuid: str, *, timeout: float | None = None,
            on_wait: Callable[[], None] | None = None) -> ServerLock:
    """Take the server's lock, waiting up to *timeout* s (None: as long as it takes)."""
    locks_dir.mkdir(mode=0o755, exist_ok=True)
    path = lock_path(locks_dir, domain_uuid)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = None if timeout is None else time.monotonic() + timeout
    warned = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return ServerLock(fd, path)
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                os.close(fd)
                raise ConflictError("another bbsnap operation on this server is still running",
                                    hint="wait for it (a snapshot copy holds the server until done)") from None
            if not warned and on_wait is not None:
                on_wait()
                warned = True
            time.sleep(0.1)


def try_acquire(locks_dir: Path, domain_uuid: str) -> ServerLock | None:
    """The lock if nobody holds it now, else None (used to tell whether a worker is alive)."""
    try:
        return acquire(locks_dir, domain_uuid, timeout=0)
    except ConflictError:
        return None
