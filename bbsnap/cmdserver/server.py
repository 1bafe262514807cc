"""The command server's process: everything imported once, then a spare child forked
ahead, waiting in accept(), so a command starts without paying for the fork either.

Run by `bbsnap command-server start` (and cmdserver/autostart.py) as ``command()`` says. One per
install and user (an flock held for the server's life). It ends after --idle-timeout
seconds without a command, on `command-server stop` or SIGTERM, and starts itself again
(exec) when a request finds the code changed on disk. It holds no libvirt or SQLite
connection and runs no thread, so its forks inherit nothing half-held: each command
opens its own, as a `bbsnap` process does.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from bbsnap import proc
from bbsnap.cmdserver import paths, session
from bbsnap.errors import BbsnapError, ConflictError

DEFAULT_IDLE_TIMEOUT = 3600.0


def serve(idle_timeout: float = DEFAULT_IDLE_TIMEOUT, ready_fd: int = -1) -> bool:
    """Serve until idle, stopped or stale; True when the code changed (start again).
    *ready_fd* gets one byte, and is closed, once commands are accepted."""
    with _lock() as lock_fd, _listening() as listener:
        _warm_imports()
        proc.set_parent_death_signal(0)  # loads ctypes' libc once, before the forks
        stamp = session.code_stamp()
        gc.freeze()  # the children's copy-on-write pages stay shared: no collector walks them
        if ready_fd >= 0:
            os.write(ready_fd, b"r")
            os.close(ready_fd)
        return _loop(listener, lock_fd, stamp, idle_timeout)


def ensure_runtime_dir() -> str:
    """The runtime directory, made 0700 if missing; BbsnapError if it is not ours alone."""
    path = paths.runtime_dir()
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise BbsnapError(f"cannot make the command server's directory {path}: "
                          f"{exc.strerror}") from None
    from bbsnap.private_dirs import refusal

    why = refusal(os.lstat(path))
    if why:
        raise BbsnapError(f"the command server's directory {path} is not to be trusted: {why}",
                          hint="remove it, or set XDG_RUNTIME_DIR to a directory of yours")
    return path


@contextmanager
def _lock() -> Iterator[int]:
    """The server's flock, held while it lives; its descriptor (each spare closes it: a
    command must not keep the next server out)."""
    ensure_runtime_dir()
    fd = os.open(paths.lock_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConflictError("a command server of this install is already running",
                                hint="`bbsnap command-server status` shows it") from None
        yield fd
    finally:
        os.close(fd)


@contextmanager
def _listening() -> Iterator[socket.socket]:
    path = paths.socket_path()
    try:
        os.unlink(path)  # a dead server's (the lock says none is alive)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(64)
        bound = os.stat(path)
        yield listener
    finally:
        listener.close()
        try:
            if os.stat(path).st_ino == bound.st_ino:
                os.unlink(path)
        except (OSError, UnboundLocalError):
            pass


def _warm_imports() -> None:
    """Import what commands import, so their forks start with it: every bbsnap module,
    libvirt and sqlite3, and every dataclass made (lazy_dataclass.py). Measured here:
    `bbsnap servers snapshot`'s own imports took ~170 ms of its ~360 ms (start-up and CLI
    85, the snapshot modules 58, libvirt ~26)."""
    import importlib
    import pkgutil

    import bbsnap
    from bbsnap.cli.lazy import load_all
    from bbsnap.cli.main import cli

    load_all(cli)  # every group and command built, as a command would find them
    for module in pkgutil.walk_packages(bbsnap.__path__, "bbsnap."):
        if module.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(module.name)
        except Exception as exc:  # an optional module: the command that needs it will say
            print(f"bbsnap command server: {module.name} not preloaded: {exc}", file=sys.stderr)
    for name in ("libvirt", "sqlite3"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    from bbsnap.lazy_dataclass import materialize_all

    materialize_all()  # each dataclass's methods made once here, not in every fork


def _loop(listener: socket.socket, lock_fd: int, stamp: dict[str, int],
          idle_timeout: float) -> bool:
    notes_r, notes_w = os.pipe2(os.O_CLOEXEC)
    spare = 0
    busy: set[int] = set()
    last_command = time.monotonic()
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: stopping.append(signum))
    restart = False
    served = 0
    try:
        while not stopping:
            if not spare:
                spare = _fork_spare(listener, (lock_fd, notes_r), notes_w, stamp, served)
            # A SIGTERM's handler only records it: select goes on (PEP 475) and the loop
            # sees it within the second.
            readable, _, _ = select.select([notes_r], [], [], 1.0)
            for note in os.read(notes_r, 64) if readable else b"":
                if note == session.NOTE_BUSY[0]:
                    busy.add(spare)
                    spare = 0
                    served += 1
                    last_command = time.monotonic()
                elif note == session.NOTE_STOP[0]:
                    stopping.append(0)
                elif note == session.NOTE_RESTART[0]:
                    restart = True
                    stopping.append(0)
            spare = _reap(busy, spare)
            if idle_timeout and not busy and time.monotonic() - last_command > idle_timeout:
                break
    finally:
        if spare:
            proc.kill_child(spare)
        os.close(notes_r)
        os.close(notes_w)
    return restart


def _fork_spare(listener: socket.socket, servers_own: tuple[int, ...], notes_w: int,
                stamp: dict[str, int], served: int) -> int:
    """The next spare; *servers_own* are the descriptors it closes (the lock, the notes'
    read end); *served*, the connections accepted before it, is what it answers a `ping`
    with (tests tell by it that a command ran here, not in its own process)."""
    server = os.getpid()
    pid = proc.fork_managed()
    if pid:
        return pid
    try:  # the spare child
        for fd in servers_own:
            os.close(fd)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        proc.set_parent_death_signal(signal.SIGTERM)  # a spare must not outlive its server
        if os.getppid() != server:
            os._exit(0)  # the server died before the line above
        conn, _ = listener.accept()  # EINTR is retried by Python itself (PEP 475)
        proc.set_parent_death_signal(0)  # a command outlives a server stopped meanwhile
        os.write(notes_w, session.NOTE_BUSY)
        listener.close()
    except BaseException:
        os._exit(1)
    session.serve(conn, notes_w, stamp, served)


def _reap(busy: set[int], spare: int) -> int:
    """Collect ended children; the spare's pid, or 0 if it ended."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return spare
        if not pid:
            return spare
        busy.discard(pid)
        if pid == spare:
            spare = 0


def command(idle_timeout: float, ready_fd: int = -1) -> list[str]:
    """The command line of a server of this install. Isolated (``-I``: no PYTHONPATH, no
    user site, and not the working directory first on the path, which ``-m`` would put
    there: a server started from a directory holding a ``click.py`` would import it), with
    this install's package named on the path, as scripts/setup's launcher does; run from
    ``/`` (control.spawn), which is also where a restart finds itself."""
    boot = (f"import sys; sys.path.insert(0, {os.path.dirname(paths.PACKAGE_DIR)!r}); "
            "from bbsnap.cmdserver.server import main; main()")
    ready = ["--ready-fd", str(ready_fd)] if ready_fd >= 0 else []
    return [sys.executable, "-I", "-c", boot, "--idle-timeout", str(idle_timeout), *ready]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bbsnap.cmdserver.server")
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT)
    parser.add_argument("--ready-fd", type=int, default=-1)
    args = parser.parse_args(argv)
    try:
        restart = serve(args.idle_timeout, args.ready_fd)
    except BbsnapError as exc:
        print(f"bbsnap command server: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    if restart:
        sys.stdout.flush()
        sys.stderr.flush()
        proc.exec_replace(command(args.idle_timeout))


if __name__ == "__main__":
    main()
