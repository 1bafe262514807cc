"""Start, stop and ask after this install's command server (`bbsnap command-server`)."""

from __future__ import annotations

import os
from pathlib import Path

from bbsnap import proc
from bbsnap.cmdserver import client, paths
from bbsnap.errors import BbsnapError

START_TIMEOUT = 120.0  # importing everything takes ~1 s here; a loaded host, much longer


def status() -> str | None:
    """The running server's description, or None."""
    return client.request("ping")


def start(idle_timeout: float) -> str:
    """Start a server unless one answers; its description once it accepts commands."""
    running = status()
    if running is not None:
        return running
    ready_r, ready_w = os.pipe()
    try:
        pid = spawn(idle_timeout, ready_fd=ready_w)
    finally:
        os.close(ready_w)
    try:
        # The server writes one byte once it listens with everything imported, and
        # the pipe ends without it if the server failed (its error is in the log).
        import select

        readable, _, _ = select.select([ready_r], [], [], START_TIMEOUT)
        ready = os.read(ready_r, 1) if readable else b""
    finally:
        os.close(ready_r)
    if not ready:
        proc.kill_child(pid)  # never ready: it must not start serving later
        raise BbsnapError("the command server did not start: " + _last_log_line(),
                          hint=f"its log is {paths.log_path()}")
    return status() or f"pid={pid} package={paths.PACKAGE_DIR}"


def spawn(idle_timeout: float, ready_fd: int = -1) -> int:
    """A server process started, detached, logging into paths.log_path(); its pid. It writes
    a byte to *ready_fd* once it accepts commands (`start` waits for it; autostart.py
    does not). BbsnapError if the runtime directory is not this user's alone."""
    from bbsnap.cmdserver.server import command, ensure_runtime_dir

    ensure_runtime_dir()
    return proc.spawn_detached(command(idle_timeout, ready_fd), log_path=Path(paths.log_path()),
                               pass_fds=(ready_fd,) if ready_fd >= 0 else (), cwd="/")


STOP_TIMEOUT = 30.0


def stop() -> str | None:
    """Ask the server to end and wait until it has let go of its lock, so that a `start`
    right after starts a new one; what it said, or None when none was running. Commands it
    is running go on (they never held the lock)."""
    said = client.request("stop")
    if said is not None:
        _wait_for_lock()
    return said


def _wait_for_lock() -> None:
    import fcntl
    import time

    try:
        fd = os.open(paths.lock_path(), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        deadline = time.monotonic() + STOP_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return  # released: the server has ended (closing fd drops ours)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BbsnapError("the command server did not end",
                                      hint=f"its log is {paths.log_path()}") from None
                time.sleep(0.01)
    finally:
        os.close(fd)


def _last_log_line() -> str:
    try:
        with open(paths.log_path(), "rb") as log:
            lines = log.read()[-4096:].decode(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "it said nothing"
