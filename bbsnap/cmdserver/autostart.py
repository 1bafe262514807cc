"""An interactive `bbsnap` that found no command server starts one, for the commands after it.

A command in its own process pays ~80 ms before its first step here: the interpreter,
~55 ms of imports (the standard library's typing, inspect, dataclasses and pathlib; click;
libvirt's shared library; bbsnap's models) and the connection. Through the server it pays
a few ms (bbsnap/cmdserver). So, as gpg starts its agent, `bbsnap` run from a terminal
starts this user's server for this install once the command is done (its output written),
and does not wait for it: the next command, in a few seconds or minutes, finds it.
It ends by itself after AUTO_IDLE_TIMEOUT without a command.

Only at a terminal (standard input and standard error both one): scripts, cron jobs,
services, CI and test runs get no process they did not ask for. They (and anyone) can
start one with `bbsnap command-server start`. ``BBSNAP_COMMAND_SERVER``:

- ``auto`` (the default): use a running server; at a terminal, start one if none runs;
- ``manual``: use a running server, never start one;
- ``off``: run every command in its own process.
"""

from __future__ import annotations

import os

from bbsnap.cmdserver import client

AUTO_IDLE_TIMEOUT = 900.0  # 15 min: a working session's pauses, not a whole day idle
MODES = ("auto", "manual", "off")


def mode() -> str:
    """BBSNAP_COMMAND_SERVER, or auto when it is unset or not a known mode."""
    value = os.environ.get("BBSNAP_COMMAND_SERVER", "")
    return value if value in MODES else "auto"


def interactive() -> bool:
    """Standard input and standard error are terminals: someone is typing the commands."""
    return os.isatty(0) and os.isatty(2)


def wanted(argv: list[str], *, at_terminal: bool) -> bool:
    """Whether the command *argv*, just run in its own process, should start a server:
    auto mode, at a terminal, a command (not --help or --version alone, and not
    `command-server ...`: `stop` must not start the next one), and a runtime directory
    that is this user's (runtime_base_is_ours)."""
    if mode() != "auto" or not at_terminal:
        return False
    path = client.command_path(argv)
    return bool(path) and path[0] != "command-server" and runtime_base_is_ours()


def runtime_base_is_ours() -> bool:
    """Whether $XDG_RUNTIME_DIR, when it names the server's directory's parent, belongs to
    this user. `sudo bbsnap ...` may keep the caller's XDG_RUNTIME_DIR: root would then
    make a root-owned bbsnap/ in the user's runtime directory, and the user's own commands
    could neither use nor start a server there (a directory not theirs is refused). An
    explicit `command-server start` still may; a command never does it unasked."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if not (base and os.path.isabs(base)):
        return True  # /tmp/bbsnap-UID: named by the user's own uid
    try:
        return os.stat(base).st_uid == os.getuid()
    except OSError:
        return False


def start_in_background() -> bool:
    """Start a server without waiting for it; True if one was started. Never raises: a
    server is a speed-up, and the command has succeeded or failed already. A second
    server started at the same moment by another command finds the lock held and ends
    (its log says so)."""
    from bbsnap.errors import BbsnapError

    try:
        from bbsnap.cmdserver import control

        if control.status() is not None:
            return False  # one started meanwhile (or refused this command: stale code)
        control.spawn(AUTO_IDLE_TIMEOUT)
    except (BbsnapError, OSError):
        return False
    return True
