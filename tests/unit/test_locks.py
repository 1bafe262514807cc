"""Server and allocation locks: private files, bounded waits that name the holder, and a
lock file that can be removed (destroy) without two processes ever holding "the" lock."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bbsnap.state import locks
from bbsnap.config import load_settings
from bbsnap.errors import ConflictError
from bbsnap.state.layout import DataDir
from bbsnap.services.server_create import ServerCreator

UUID = "0c4b6f1e-2a39-4a8e-9d6c-3d0f5d0e9a11"
HOLDER = """
import sys, time
from pathlib import Path
from bbsnap.state import locks
lock = locks.acquire_path(Path(sys.argv[1]), purpose=sys.argv[2])
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


class HeldElsewhere:
    """Another process holding the lock at *path* (it writes itself into the file)."""

    def __init__(self, path: Path, purpose: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), purpose],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "held\n"

    def __enter__(self) -> "HeldElsewhere":
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def test_lock_files_are_private(tmp_path):
    locks_dir = tmp_path / "locks"
    with locks.acquire(locks_dir, UUID, purpose="test"):
        pass
    assert stat.S_IMODE(os.stat(locks_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(locks.lock_path(locks_dir, UUID)).st_mode) == 0o600


def test_an_older_world_readable_lock_file_is_tightened(tmp_path):
    path = tmp_path / "x.lock"
    path.touch()
    os.chmod(path, 0o644)
    with locks.acquire_path(path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_wait_is_bounded_and_names_the_holder(tmp_path):
    path = locks.lock_path(tmp_path, UUID)
    with HeldElsewhere(path, "servers stop srv-abcde") as other:
        started = time.monotonic()
        with pytest.raises(ConflictError) as caught:
            locks.acquire(tmp_path, UUID, timeout=0.3)
        waited = time.monotonic() - started
    assert 0.3 <= waited < 5
    message = str(caught.value)
    assert f"held by pid {other.proc.pid} (servers stop srv-abcde)" in message, message
    assert "gave up after 0.3 s" in message and "lock_timeout" in message
    assert caught.value.exit_code == 4


def test_a_holder_that_handed_the_lock_on_is_named_as_such(tmp_path):
    """A snapshot's command takes the lock and exits; its worker holds it on. The file
    names a dead pid: the message says so instead of claiming that pid is alive."""
    lock = locks.acquire(tmp_path, UUID)
    locks.record_holder(lock, "999999:1:gone", "copying snapshot img-abcde")
    try:
        with pytest.raises(ConflictError, match=r"took it over from pid 999999 "
                                                r"\(copying snapshot img-abcde\)"):
            # Another descriptor of the same process conflicts like another process.
            locks.acquire(tmp_path, UUID, timeout=0)
    finally:
        lock.release()


def test_the_allocation_lock_of_servers_create_is_bounded(tmp_path):
    settings = load_settings({"data_dir": str(tmp_path / "data")},
                             {"BBSNAP_CONFIG": "", "BBSNAP_LOCK_TIMEOUT": "0.2"})
    data = DataDir.from_settings(settings).ensure()
    assert data.lock_timeout == 0.2
    creator = ServerCreator(None, data, None, settings, lambda: "tcg")  # type: ignore[arg-type]
    with HeldElsewhere(data.servers_dir / ".allocate.lock", "servers create") as other:
        with pytest.raises(ConflictError, match=f"another servers create is still running "
                                                f"\\(held by pid {other.proc.pid}"):
            with creator._allocation_lock():
                pass
    with creator._allocation_lock():  # free again once the holder is gone
        pass


def test_a_waiter_on_a_removed_lock_file_locks_the_new_one(tmp_path):
    """destroy unlinks the lock file while holding it. A waiter that opened the old file
    gets the flock on the unlinked inode; it must notice and lock the file now at the path,
    or a third process (on the new file) and it would both hold the server's lock."""
    path = locks.lock_path(tmp_path, UUID)
    holder = locks.acquire(tmp_path, UUID)
    waiting = threading.Event()
    got: list[locks.ServerLock] = []
    waiter = threading.Thread(target=lambda: got.append(
        locks.acquire(tmp_path, UUID, timeout=10, on_wait=waiting.set)))
    waiter.start()
    assert waiting.wait(5), "the waiter should be blocked on the old file"
    locks.remove_held(holder)
    assert not path.exists()
    holder.release()
    waiter.join(10)
    (lock,) = got
    try:
        # Its descriptor is on the linked file at the path, not on the removed one (the
        # inode number itself may be reused once the old file is closed, so ask nlink).
        held = os.fstat(lock.fd)
        assert held.st_nlink == 1 and held.st_ino == os.stat(path).st_ino
        assert locks.try_acquire(tmp_path, UUID) is None, "the path's lock must be the held one"
    finally:
        lock.release()


def test_remove_held_leaves_a_file_that_is_not_the_held_one(tmp_path):
    path = locks.lock_path(tmp_path, UUID)
    lock = locks.acquire(tmp_path, UUID)
    path.unlink()
    newer = locks.acquire(tmp_path, UUID)  # someone made and locked a new file meanwhile
    locks.remove_held(lock)
    assert path.exists() and os.stat(path).st_ino == os.fstat(newer.fd).st_ino
    lock.release()
    newer.release()
