"""Per-server locks: one bbsnap operation on a server at a time.

libvirt blocks a second job on a domain (for up to 30 s, then fails), so bbsnap
serialises its own operations per domain with an flock on
``DATA/locks/<domain uuid>.lock``. A snapshot's background worker inherits the
open lock from the command that started it, so the lock is held until the copy
is finished, and is released by the kernel if the worker dies.

Lock files are 0600 in a 0700 directory: another user cannot open them, so
cannot hold them. Every wait is bounded (``lock_timeout``) and ends with a
ConflictError naming the holder: whoever takes a lock writes its job token (pid,
start time, boot: it survives pid reuse) and what it is doing into the file.
A destroyed server's lock file is unlinked while held; a locker that then gets
the lock on the unlinked inode notices (the path no longer leads to the file it
locked) and starts over on the path's new file, so two processes never both
believe they hold "the" lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Callable

from bbsnap.errors import ConflictError
from bbsnap.lazy_dataclass import dataclass
from bbsnap.state.process_tokens import current_job_token, job_alive

LOCK_FILE_MODE = 0o600
LOCK_DIR_MODE = 0o700
# A waiter gives up after this long. Long, because the usual holder is a snapshot's copy
# (servers stop/destroy/snapshot wait for it): a copy of a few hundred GiB under load
# takes tens of minutes, and giving up early would fail a script that merely queued
# behind it. A hung holder is still reported, with its pid, instead of a silent wait.
DEFAULT_LOCK_TIMEOUT = 3600.0
POLL_SECONDS = 0.1


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


@dataclass(frozen=True)
class Holder:
    """Who wrote itself into a lock file last, and whether that process still lives."""

    token: str
    purpose: str

    @property
    def pid(self) -> str:
        return self.token.split(":", 1)[0]

    def describe(self) -> str:
        doing = f" ({self.purpose})" if self.purpose else ""
        if job_alive(self.token):
            return f"pid {self.pid}{doing}"
        # Handed on (a snapshot's worker inherits the lock) or the file is stale: the
        # kernel says someone holds it, so name what we know without claiming a live pid.
        return f"a process that took it over from pid {self.pid}{doing}"


def lock_path(locks_dir: Path, domain_uuid: str) -> Path:
    return locks_dir / f"{domain_uuid}.lock"


def acquire(locks_dir: Path, domain_uuid: str, *, timeout: float | None = None,
            on_wait: Callable[[], None] | None = None, purpose: str = "") -> ServerLock:
    """Take the server's lock, waiting up to *timeout* s (None: DEFAULT_LOCK_TIMEOUT)."""
    locks_dir.mkdir(mode=LOCK_DIR_MODE, exist_ok=True)
    return acquire_path(lock_path(locks_dir, domain_uuid), timeout=timeout, on_wait=on_wait,
                        purpose=purpose, busy="another bbsnap operation on this server")


def acquire_path(path: Path, *, timeout: float | None = None,
                 on_wait: Callable[[], None] | None = None, purpose: str = "",
                 busy: str = "another bbsnap operation") -> ServerLock:
    """An exclusive flock on *path* (created 0600), recording us as its holder."""
    limit = DEFAULT_LOCK_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + limit
    while True:
        fd = _open_lock_file(path)
        if not _wait_for_flock(fd, deadline, on_wait):
            holder = read_holder(path)
            os.close(fd)
            who = f" (held by {holder.describe()})" if holder else ""
            raise ConflictError(f"{busy} is still running{who}; gave up after {limit:g} s",
                                hint="wait for it (a snapshot copy holds the server until "
                                     "done), or raise lock_timeout (BBSNAP_LOCK_TIMEOUT)")
        if _still_at(fd, path):
            lock = ServerLock(fd, path)
            record_holder(lock, current_job_token(), purpose)
            return lock
        os.close(fd)  # we locked a file unlinked meanwhile (a destroy): lock the path's new one
        on_wait = None  # said once already


def try_acquire(locks_dir: Path, domain_uuid: str) -> ServerLock | None:
    """The lock if nobody holds it now, else None (used to tell whether a worker is alive)."""
    try:
        return acquire(locks_dir, domain_uuid, timeout=0)
    except ConflictError:
        return None


def record_holder(lock: ServerLock, token: str, purpose: str) -> None:
    """Write who holds *lock* into its file (a snapshot names its worker once spawned)."""
    line = f"{token} {purpose}".strip().replace("\n", " ") + "\n"
    os.ftruncate(lock.fd, 0)
    os.pwrite(lock.fd, line.encode(), 0)


def read_holder(path: Path) -> Holder | None:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    if not text:
        return None
    token, _, purpose = text.partition(" ")
    return Holder(token, purpose)


def remove_held(lock: ServerLock) -> None:
    """Unlink the lock file while holding it (a destroyed server's): lockers waiting on
    the old inode see it is gone from the path when they get it, and start over."""
    try:
        if _still_at(lock.fd, lock.path):
            lock.path.unlink()
    except FileNotFoundError:
        pass


def _open_lock_file(path: Path) -> int:
    # O_NOFOLLOW: a symlink planted at the path must not make us create or lock elsewhere.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, LOCK_FILE_MODE)
    if os.fstat(fd).st_mode & 0o077:  # made 0644 by an older bbsnap
        os.fchmod(fd, LOCK_FILE_MODE)
    return fd


def _wait_for_flock(fd: int, deadline: float, on_wait: Callable[[], None] | None) -> bool:
    """Poll for the flock until *deadline*; whether we got it. *on_wait* once, on the
    first failed try."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            if on_wait is not None:
                on_wait()
                on_wait = None
            time.sleep(POLL_SECONDS)


def _still_at(fd: int, path: Path) -> bool:
    """Whether *path* still names the file *fd* is open on."""
    try:
        here = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
