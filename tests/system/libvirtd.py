"""Restarting the shared libvirtd from inside a system test, safely for the suite's lock.

The tests run under ``flock /tmp/bbsnap-libvirtd.lock``, so pytest holds the lock's
descriptor; a libvirtd started from a test that inherited it would hold the lock forever
(every other engineer's run would wait on it). scripts/setup starts its daemons in a
subshell that closes every descriptor but 0-2 (``detached``); here Python's subprocess does
the same (``close_fds=True``, its default, made explicit). And libvirtd is started the way
setup decides: under ``tini -s`` (a subreaper that reaps the QEMUs it starts at once) when
pid 1 is no init that reaps them and tini is installed, else daemonised with ``-d`` — by
that rule, not by how the running one was started (a libvirtd someone started by hand
with ``-d`` comes back under tini). Not scripts/setup itself: from a worktree it would
reinstall bbsnap from there.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

URI = "qemu:///system"
STDERR_LOG = Path("/var/log/libvirt/libvirtd-stderr.log")  # where scripts/setup sends it


def _pid() -> int:
    found = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    assert len(pids) == 1, f"expected one libvirtd, found {pids}"
    return pids[0]


# scripts/setup's pid1_reaps: the inits that reap orphans at once.
_REAPING_INITS = ("systemd", "init", "tini", "dumb-init", "docker-init", "catatonit",
                  "s6-svscan", "runit")


def _needs_tini() -> bool:
    init = Path("/proc/1/comm").read_text().strip()
    return init not in _REAPING_INITS and shutil.which("tini") is not None


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: its parent may not be an init that reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def answers() -> bool:
    return subprocess.run(["virsh", "-q", "-c", URI, "version"],
                          capture_output=True).returncode == 0


def restart_libvirtd(timeout: float = 60) -> None:
    """Stop libvirtd (SIGTERM: as a service manager would) and start it again as
    scripts/setup would; returns once it answers. Running guests go on: QEMU is not libvirtd's child."""
    pid = _pid()
    os.kill(pid, signal.SIGTERM)
    _wait(lambda: _gone(pid), timeout, "libvirtd to stop")
    if _needs_tini():
        with STDERR_LOG.open("ab") as log:
            subprocess.run(["setsid", "-f", "tini", "-s", "--", "libvirtd"],
                           stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                           check=True)
    else:
        subprocess.run(["libvirtd", "-d"], stdin=subprocess.DEVNULL, close_fds=True,
                       check=True)
    _wait(answers, timeout, "libvirtd to answer again")
