"""Ending a local domain's QEMU just before libvirt's destroy, so that the destroy does not sleep.

libvirt 9.0's ``virDomainDestroy`` sends QEMU SIGTERM and then checks only every 200 ms
whether it is gone (``virProcessKillPainfullyDelay``): QEMU exits in ~5 ms, and every
destroy still takes >= 200 ms (a memory revert pays it between the old guest and the new).
What was measured (thirteenth session, a 128 MiB domain under TCG, three runs each):

- a plain destroy: 206-210 ms;
- QEMU sent SIGTERM (or SIGKILL) by this process first, then destroyed: 202-212 ms. libvirt
  sees QEMU's monitor socket close as the process exits, before the kernel has reaped it;
  its own stop then finds the process still there and sleeps its 200 ms (the shutoff reason
  also becomes "shutdown", not "destroyed");
- the same SIGTERM with QEMU's connected unix sockets (the monitor's, the guest agent's)
  duplicated into this process first (``pidfd_getfd``) and held until the kernel has reaped
  QEMU, then the destroy: 11-17 ms in all, shutoff reason "destroyed" as for a plain one.
  libvirt's SIGTERM finds no process (ESRCH) and returns at once.

SIGTERM, not SIGKILL: QEMU closes its images in order (their caches flushed), as under
libvirt's own destroy, which sends the same signal; QEMU logs "terminating on signal 15 from
pid <this process>". SIGKILL only when the caller throws the whole machine state away (a
memory revert: new disks, and RAM and NVRAM from the image): QEMU then has nothing to close
in order. Measured (seventeenth session, 256 MiB tiny guest, three reverts each): QEMU gone
2.3-5.4 ms after SIGKILL against 5.3-17.9 ms after SIGTERM (its images closed, its RAM
freed, its threads joined).

Holding the monitor open has one trap, measured: with QEMU gone and its monitor still open,
a libvirt job that sends QEMU a command waits for an answer that never comes. libvirt starts
such a job itself on the SHUTDOWN event QEMU sends on SIGTERM when the domain's
``on_poweroff`` is ``restart`` (or a reboot through ACPI is pending): its fake-reboot thread
sends ``system_reset`` and holds the domain's job lock, so the destroy waited libvirt's 30 s
job timeout and failed (a client polling the domain's stats at that moment would do the
same). So the held sockets are let go once the destroy has run a moment
(``RELEASE_AFTER``): the stuck job then gets its end of file and gives the lock up, and the
destroy goes on. The normal destroy returns in 6-9 ms, well inside it.

Whatever fails here (no pid file, another user's QEMU under a ptrace restriction, a
``/proc`` without the process), nothing is signalled and the caller's destroy runs as before.
If this process dies while it holds the sockets, the kernel closes them: libvirt sees QEMU's
end and marks the domain shut off, as after any crash of QEMU.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bbsnap import proc

_SYS_PIDFD_GETFD = 438  # the same number on every architecture Linux numbers alike (5.6+)
_SS_CONNECTED = "03"  # /proc/net/unix's state column
EXIT_TIMEOUT = 1.0  # QEMU closing its images; longer, libvirt's destroy goes on as it would
REAP_TIMEOUT = 0.25  # the exited QEMU reaped by its parent (init): measured 0-0.6 ms
RELEASE_AFTER = 0.05  # see the module's docstring: a stuck libvirt job gets its EOF then


def pid_file(uri: str, name: str) -> Path | None:
    """Where a local libvirt's QEMU driver keeps the domain's pid, or None for a remote or
    unusual URI. libvirt 9.0: ``<state dir>/<name>.pid``, the state dir ``/run/libvirt/qemu``
    for qemu:///system and ``<runtime dir>/libvirt/qemu/run`` for qemu:///session."""
    if uri == "qemu:///system":
        return Path("/run/libvirt/qemu") / f"{name}.pid"
    if uri == "qemu:///session":
        runtime = os.environ.get("XDG_RUNTIME_DIR") or os.path.expanduser("~/.cache")
        return Path(runtime) / "libvirt" / "qemu" / "run" / f"{name}.pid"
    return None


def connected_unix_inodes(net_unix: str) -> set[str]:
    """The socket inodes of the connected unix sockets in a ``/proc/<pid>/net/unix`` text."""
    inodes = set()
    for line in net_unix.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 7 and fields[5] == _SS_CONNECTED:
            inodes.add(fields[6])
    return inodes


def is_domains_qemu(cmdline: bytes, uuid: str) -> bool:
    """Whether a ``/proc/<pid>/cmdline`` is the QEMU of the domain with this UUID."""
    return f"\0-uuid\0{uuid.lower()}\0".encode() in cmdline.lower()


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    import ctypes

    new = proc.libc().syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    if new < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return int(new)


class _HeldSockets:
    """Duplicates of QEMU's connected unix sockets, closed once (from either thread)."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def _hold_sockets(pid: int, pidfd: int) -> _HeldSockets:
    """Duplicate QEMU's connected unix sockets (OSError: not allowed, or QEMU gone)."""
    connected = connected_unix_inodes(Path(f"/proc/{pid}/net/unix").read_text())
    held = _HeldSockets()
    try:
        for entry in os.scandir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(entry.path)
            except FileNotFoundError:
                continue  # closed since the listing
            if target.startswith("socket:[") and target[8:-1] in connected:
                held.fds.append(_pidfd_getfd(pidfd, int(entry.name)))
    except OSError:
        held.release()
        raise
    return held


def _wait_gone(pidfd: int) -> bool:
    """Wait for QEMU to exit and to be reaped; False if it took longer than the bounds."""
    if not select.select([pidfd], [], [], EXIT_TIMEOUT)[0]:
        return False  # readable once the process has exited
    deadline = time.monotonic() + REAP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            signal.pidfd_send_signal(pidfd, 0)  # a zombie still takes a signal
        except ProcessLookupError:
            return True
        time.sleep(0.0005)  # no event tells a reap to anyone but the parent
    return False


def _open_qemu(pid_path: Path, uuid: str) -> tuple[int, int] | None:
    """(pid, pidfd) of the domain's QEMU, checked to be it after the pidfd pins the process."""
    try:
        pid = int(pid_path.read_text().strip())
        pidfd = os.pidfd_open(pid)
    except (OSError, ValueError):
        return None
    try:
        if is_domains_qemu(Path(f"/proc/{pid}/cmdline").read_bytes(), uuid):
            return pid, pidfd
    except OSError:
        pass
    os.close(pidfd)
    return None


@contextmanager
def ended_first(pid_path: Path | None, uuid: str, *, kill: bool = False) -> Iterator[bool]:
    """Around the caller's ``virDomainDestroy``: QEMU ended and reaped first, with its
    monitor held open so libvirt does not notice before its destroy (True), or nothing done
    (False: the destroy then ends QEMU the usual way). *kill*: SIGKILL, for a QEMU whose
    state is all thrown away after (see the module's docstring)."""
    opened = _open_qemu(pid_path, uuid) if pid_path is not None else None
    if opened is None:
        yield False
        return
    pid, pidfd = opened
    try:
        try:
            held = _hold_sockets(pid, pidfd)
        except OSError:
            yield False
            return
        if not held.fds:  # nothing that would tell libvirt: its destroy would sleep anyway
            yield False
            return
        timer = None
        try:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL if kill else signal.SIGTERM)
                gone = _wait_gone(pidfd)
            except OSError:  # not ours to signal after all: libvirt's destroy does it
                gone = False
            if gone:
                timer = threading.Timer(RELEASE_AFTER, held.release)
                timer.daemon = True
                timer.start()
            else:
                held.release()  # still closing its images: libvirt's destroy waits for it
            yield gone
        finally:
            if timer is not None:
                timer.cancel()
            held.release()
    finally:
        os.close(pidfd)
