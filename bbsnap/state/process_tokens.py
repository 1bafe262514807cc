"""Who is working on a `creating` image: a token that survives pid reuse.

A row in state ``creating`` carries the token of the process doing the work.
When that process is gone (killed, host rebooted), the next bbsnap command sees
the token is dead and recovers the row, so nothing stays ``creating`` forever.
"""

from __future__ import annotations

import os


def _start_ticks(pid: int) -> str | None:
    """Process start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    if fields and fields[0] in ("Z", "X"):
        # Dead, not yet reaped: a worker forked by a long-lived process (proc.fork_detached)
        # stays a zombie until its parent next reaps; its work is over all the same.
        return None
    return fields[19] if len(fields) > 19 else None


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()[:8]
    except OSError:
        return "noboot"


def current_job_token() -> str:
    return token_for_pid(os.getpid()) or f"{os.getpid()}:?:{boot_id()}"


def token_for_pid(pid: int) -> str | None:
    ticks = _start_ticks(pid)
    return f"{pid}:{ticks}:{boot_id()}" if ticks else None


def job_alive(token: str | None) -> bool:
    if not token:
        return False
    try:
        pid_text, ticks, boot = token.split(":")
        pid = int(pid_text)
    except ValueError:
        return False
    if boot != boot_id():
        return False
    return _start_ticks(pid) == ticks
