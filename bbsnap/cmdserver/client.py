"""The `bbsnap` entry point's side of the command server: hand the command over, relay
the signals the terminal sends, return its exit status.

Built-in modules only, imported on every `bbsnap` start: _socket and _signal, not socket
and signal, whose enums cost ~10 ms to import here (a whole command through the server
takes tens of ms). Anything unexpected before the server said it started the command
means "run it here instead" (None): nothing has been run.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # no stub; `signal` would import enum
import _socket
import os
import sys
from _collections_abc import Iterator  # loaded at start-up; collections.abc is not

from bbsnap.cmdserver import paths, protocol

# What a terminal or a supervisor sends the command; the command runs in the server's
# child, so each is passed on to it (^C becomes the command's KeyboardInterrupt, exit 130).
FORWARDED_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT,
                     _signal.SIGWINCH)
_PEERCRED_LEN = 12  # struct ucred: pid, uid, gid


# Commands that hand the terminal to another program by exec (`servers ssh`): in the
# server's child the exec would close the connection, and the waiting `bbsnap` would end
# while ssh still reads the terminal. They run in their own process.
OWN_PROCESS_COMMANDS = {("servers", "ssh")}
# The root's options that take a value as the next word (cli/main.py).
_ROOT_OPTIONS_WITH_VALUE = {"-c", "--connect", "--data-dir"}


def run(argv: list[str]) -> int | None:
    """Run `bbsnap ARGV` in the command server and return its exit status, or None when
    no server of this install is there to run it (the caller runs it in-process)."""
    if os.environ.get("BBSNAP_COMMAND_SERVER", "") == "off":
        return None
    if command_path(argv) in OWN_PROCESS_COMMANDS:
        return None
    sock = connect()
    if sock is None:
        return None
    try:
        try:
            data = protocol.encode("run", paths.PACKAGE_DIR, argv)
            fds = protocol.fds_message([0, 1, 2])
            sent = sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
            sock.sendall(data[sent:])
        except OSError:
            return None  # a standard stream closed, or the server went away: run it here
        return _follow(sock)
    finally:
        sock.close()


def command_path(argv: list[str]) -> tuple[str, ...]:
    """The group and command *argv* names (`servers ssh`), past the root's options."""
    words: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = word in _ROOT_OPTIONS_WITH_VALUE
        else:
            words.append(word)
            if len(words) == 2:
                break
    return tuple(words)


def request(kind: str) -> str | None:
    """A `ping` or `stop` request's answer; None when no server of this install answers."""
    sock = connect()
    if sock is None:
        return None
    try:
        sock.sendall(protocol.encode(kind, paths.PACKAGE_DIR, []))
        for line in _lines(sock):
            if line.startswith(b"info "):
                return line[5:].decode(errors="replace")
        return None
    except OSError:
        return None
    finally:
        sock.close()


def connect() -> _socket.socket | None:
    """A connection to this install's server, run by this user; None when there is none
    (no socket: one stat on the common path), or it is not to be trusted."""
    path = paths.socket_path()
    try:
        os.stat(path)
    except OSError:
        return None
    if not paths.trusted_runtime_dir():
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
        cred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _PEERCRED_LEN)
    except OSError:
        sock.close()
        return None  # a socket left by a server that died: run it here
    if int.from_bytes(cred[4:8], sys.byteorder) != os.getuid():
        sock.close()
        return None
    return sock


def _follow(sock: _socket.socket) -> int | None:
    pid = 0
    try:
        for line in _lines(sock):
            word, _, rest = line.partition(b" ")
            if word == b"refused" and not pid:
                return None
            if word == b"pid" and not pid:
                pid = int(rest)
                _forward_signals_to(pid)
            elif word == b"exit" and pid:
                return int(rest)
    except (OSError, ValueError):
        pass  # reset (a server stopped with this request still queued) or garbled: as EOF
    if not pid:
        return None  # it ended before starting the command: nothing ran
    os.write(2, b"bbsnap: error: the command's process in the command server ended without "
                b"an exit status (killed?)\n")
    return 1


def _forward_signals_to(pid: int) -> None:
    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass  # it has just ended: its exit status is on its way

    for signum in FORWARDED_SIGNALS:
        _signal.signal(signum, forward)


def _lines(sock: _socket.socket) -> Iterator[bytes]:
    buffered = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return
        buffered += chunk
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            yield line

