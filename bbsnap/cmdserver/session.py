"""One connection to the command server, in the spare child that accepted it: read the
request, become the client's process (streams, directory, umask, environment,
arguments), run the command, report its exit status, end.

What is set up here is everything a `bbsnap` process takes from its caller. What cannot
be taken over is refused before anything runs, so the client runs the command itself:
another install's request, other groups than the server's (a user added to `libvirt`
after the server started), code changed on disk since the server imported it.
"""

from __future__ import annotations

import array
import fcntl
import io
import os
import signal
import socket
import struct
import sys
import time
from typing import NoReturn

from bbsnap.cmdserver import paths, protocol
from bbsnap.cmdserver.request import Request, decode, payload_length

NOTE_BUSY = b"B"  # to the server: this spare has a connection, fork the next one
NOTE_STOP = b"S"  # to the server: end (a `stop` request)
NOTE_RESTART = b"R"  # to the server: the code changed, start again from it


def serve(conn: socket.socket, notes: int, code_stamp: dict[str, int], served: int) -> NoReturn:
    """Handle *conn* and end this process (it never returns)."""
    try:
        _handle(conn, notes, code_stamp, served)
    except Exception as exc:  # a child must never return into the server
        print(f"bbsnap command server: a connection failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
    os._exit(0)


def _handle(conn: socket.socket, notes: int, code_stamp: dict[str, int], served: int) -> None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid != os.getuid():
        return  # the directory is 0700, so only root could get here: still not its server
    request, fds = _receive(conn)
    try:
        if request.kind == "ping":
            conn.sendall(f"info {_info(served)}\n".encode())
            return
        if request.kind == "stop":
            os.write(notes, NOTE_STOP)
            conn.sendall(f"info stopping {os.getppid()}\n".encode())
            return
        why = _refusal(request, code_stamp, len(fds))
        if why:
            if why == STALE:
                os.write(notes, NOTE_RESTART)
            conn.sendall(f"refused {why}\n".encode())
            return
        _become(request, fds)  # empties fds
    finally:
        for fd in fds:
            os.close(fd)
    os.close(notes)
    _die_with_client(conn)
    conn.sendall(b"pid %d\n" % os.getpid())
    from bbsnap.cli.main import run_command

    code = run_command()
    conn.sendall(b"exit %d\n" % code)


STALE = "the code changed since the command server started"


def _receive(conn: socket.socket) -> tuple[Request, list[int]]:
    fds_space = socket.CMSG_SPACE(protocol.STREAM_FDS * array.array("i").itemsize)
    data, ancillary, _, _ = conn.recvmsg(1 << 16, fds_space)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(protocol.fds_from(payload))
    try:
        while len(data) < protocol.HEADER_LEN:
            data += _recv_some(conn)
        length = payload_length(data[:protocol.HEADER_LEN])
        while len(data) < protocol.HEADER_LEN + length:
            data += _recv_some(conn)
        return decode(data[protocol.HEADER_LEN:protocol.HEADER_LEN + length]), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _recv_some(conn: socket.socket) -> bytes:
    chunk = conn.recv(1 << 16)
    if not chunk:
        raise ValueError("the request was cut short")
    return chunk


def _refusal(request: Request, code_stamp: dict[str, int], nfds: int) -> str:
    if request.kind != "run" or nfds != protocol.STREAM_FDS:
        return "not a command"
    if request.package_dir != paths.PACKAGE_DIR:
        return "another install's command"
    if set(request.groups) != set(os.getgroups()):
        return "the user's groups changed since the command server started"
    if not os.path.isdir(request.cwd):
        return "the working directory is gone"
    if code_changed(code_stamp):
        return STALE
    return ""


def code_stamp() -> dict[str, int]:
    """The modification times of every bbsnap module this process has imported."""
    stamp = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.startswith(paths.PACKAGE_DIR + os.sep):
            try:
                stamp[path] = os.stat(path).st_mtime_ns
            except OSError:
                continue
    return stamp


def code_changed(stamp: dict[str, int]) -> bool:
    for path, mtime in stamp.items():
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return True
        except OSError:
            return True
    return False


def _become(request: Request, fds: list[int]) -> None:
    """Take over the client's directory, umask, environment, arguments and streams (the
    streams last: what fails before them is logged by the server, and the client, told
    nothing, runs the command itself)."""
    os.chdir(request.cwd)
    os.umask(request.umask)
    os.environ.clear()  # os.environ is rebound nowhere: config's defaults hold this object
    os.environ.update(request.environ)
    time.tzset()
    sys.argv = ["bbsnap", *request.argv]
    for target in range(len(fds)):
        fd = fds.pop(0)  # taken off the caller's list: never closed twice
        try:
            os.dup2(fd, target)  # dup2's copy is inheritable, as a process's 0-2 are
        finally:
            os.close(fd)
    _reopen_standard_streams()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                      else signal.SIG_DFL)


def _reopen_standard_streams() -> None:
    """New sys.stdin/stdout/stderr on descriptors 0-2, buffered as Python would have for
    these files at start-up (the server's own were /dev/null)."""
    encoding = sys.stdout.encoding
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                 encoding=encoding)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                  encoding=encoding, line_buffering=os.isatty(1))
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
                                  encoding=encoding, errors="backslashreplace",
                                  line_buffering=True)


def _die_with_client(conn: socket.socket) -> None:
    """End this process the moment the client's goes, as a `bbsnap` process killed
    mid-command would end: SIGIO's default action is to terminate, and with O_ASYNC the
    kernel sends it when the connection becomes readable, which from here on it only
    does at the client's end (the client never writes after its request)."""
    fcntl.fcntl(conn.fileno(), fcntl.F_SETOWN, os.getpid())
    flags = fcntl.fcntl(conn.fileno(), fcntl.F_GETFL)
    fcntl.fcntl(conn.fileno(), fcntl.F_SETFL, flags | os.O_ASYNC)
    signal.signal(signal.SIGIO, signal.SIG_DFL)
    import select

    readable, _, _ = select.select([conn], [], [], 0)
    if readable:  # gone before O_ASYNC was set: no signal will come
        os._exit(1)


def _info(served: int) -> str:
    return f"pid={os.getppid()} served={served} package={paths.PACKAGE_DIR}"
