"""The only place in bbsnap that starts subprocesses.

Always an argv list (never a shell), always a timeout, and a failure becomes an
:class:`ExternalCommandError` that names the command and quotes its stderr.
Untrusted-input commands can be given resource limits (address space, CPU time)
applied in the child before exec.
"""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bbsnap.errors import ExternalCommandError, NotFoundError
from bbsnap.lazy_dataclass import dataclass

DEFAULT_TIMEOUT = 600.0


@dataclass(frozen=True)
class Limits:
    """Resource limits for a child that handles untrusted data."""

    address_space_bytes: int | None = 1 << 30  # qemu-img info on a crafted header
    cpu_seconds: int | None = 30
    # glibc reserves up to 64 MiB of address space per malloc arena, one arena per thread
    # up to 8 per core: a qemu-img convert whose I/O threads multiplied under load ran out
    # of its address-space limit and aborted in qemu_thread_create (EAGAIN).
    malloc_arenas: int | None = 2

    def environment(self) -> dict[str, str]:
        """Variables the limited child needs on top of the caller's environment."""
        if self.malloc_arenas is None:
            return {}
        return {"MALLOC_ARENA_MAX": str(self.malloc_arenas)}

    def preexec(self) -> Callable[[], None]:
        def apply() -> None:
            if self.address_space_bytes is not None:
                resource.setrlimit(resource.RLIMIT_AS,
                                   (self.address_space_bytes, self.address_space_bytes))
            if self.cpu_seconds is not None:
                resource.setrlimit(resource.RLIMIT_CPU,
                                   (self.cpu_seconds, self.cpu_seconds))
        return apply


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def which(program: str) -> str:
    """Absolute path of *program* on PATH, or NotFoundError naming the package to install."""
    import shutil  # here: it imports bz2 and lzma, ~4 ms of every command that runs none

    found = shutil.which(program)
    if found is None:
        raise NotFoundError(f"required program '{program}' is not installed",
                            hint="run scripts/setup to install bbsnap's system packages")
    return found


def run(argv: Sequence[str | os.PathLike[str]], *, timeout: float = DEFAULT_TIMEOUT,
        check: bool = True, limits: Limits | None = None,
        input_text: str | None = None, env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None) -> Result:
    """Run *argv* to completion and capture its text output."""
    args = [os.fspath(a) for a in argv]
    if limits is not None:
        env = {**limits.environment(), **(env or {})}
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        completed = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, input=input_text,
            env=full_env, cwd=cwd, check=False,
            preexec_fn=limits.preexec() if limits else None,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise NotFoundError(f"required program '{args[0]}' is not installed",
                            hint="run scripts/setup") from exc
    except subprocess.TimeoutExpired as exc:
        raise ExternalCommandError(f"{_name(args)} did not finish within {timeout:g} s",
                                   argv=args) from exc
    result = Result(args, completed.returncode, completed.stdout, completed.stderr)
    if check and completed.returncode != 0:
        raise ExternalCommandError(
            f"{_name(args)} failed (exit {completed.returncode}): {_last_line(completed.stderr)}",
            argv=args, returncode=completed.returncode, stderr=completed.stderr)
    return result


def run_reporting(argv: Sequence[str | os.PathLike[str]], on_output: Callable[[str], None], *,
                  timeout: float = DEFAULT_TIMEOUT, limits: Limits | None = None) -> Result:
    """Run *argv* to completion like :func:`run`, handing each piece of its standard output
    to *on_output* as it comes (pieces end at a newline or a carriage return: progress
    meters such as ``qemu-img -p`` rewrite one line with \r)."""
    import selectors
    import tempfile
    import time

    args = [os.fspath(a) for a in argv]
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryFile() as errors:  # a file: a chatty stderr cannot block the child
        try:
            child = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
                env={**os.environ, **limits.environment()} if limits else None,
                preexec_fn=limits.preexec() if limits else None)
        except FileNotFoundError as exc:
            raise NotFoundError(f"required program '{args[0]}' is not installed",
                                hint="run scripts/setup") from exc
        assert child.stdout is not None
        pending = b""
        with child, selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    child.kill()
                    raise ExternalCommandError(
                        f"{_name(args)} did not finish within {timeout:g} s", argv=args)
                chunk = os.read(child.stdout.fileno(), 65536)
                if not chunk:
                    break
                pieces = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
                pending = pieces.pop()
                for piece in pieces:
                    if piece.strip():
                        on_output(piece.decode(errors="replace"))
            returncode = child.wait(timeout=max(deadline - time.monotonic(), 1))
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    if returncode != 0:
        raise ExternalCommandError(
            f"{_name(args)} failed (exit {returncode}): {_last_line(stderr)}",
            argv=args, returncode=returncode, stderr=stderr)
    return Result(args, returncode, "", stderr)


def popen(argv: Sequence[str | os.PathLike[str]], *, stdin: int | None = None,
          stdout: int | None = None, stderr: int | None = subprocess.PIPE,
          limits: Limits | None = None, die_with_parent: bool = False) -> subprocess.Popen[bytes]:
    """Start a streaming child (binary pipes); the caller owns waiting for it.

    *die_with_parent*: the kernel sends the child SIGTERM when bbsnap dies (even by
    SIGKILL), so helpers such as qemu-nbd never outlive a killed command.
    """
    args = [os.fspath(a) for a in argv]
    setup = limits.preexec() if limits else None

    def preexec() -> None:
        if die_with_parent:
            _set_parent_death_signal()
        if setup is not None:
            setup()

    extra = limits.environment() if limits else {}
    try:
        return subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr,
                                env={**os.environ, **extra} if extra else None,
                                preexec_fn=preexec if (setup or die_with_parent) else None)
    except FileNotFoundError as exc:
        raise NotFoundError(f"required program '{args[0]}' is not installed",
                            hint="run scripts/setup") from exc


def _name(args: list[str]) -> str:
    return Path(args[0]).name if args else "command"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def exec_replace(argv: Sequence[str]) -> None:
    """Replace this process with *argv* (``servers ssh``): the user talks to it directly."""
    args = [os.fspath(a) for a in argv]
    try:
        os.execvp(args[0], args)
    except FileNotFoundError as exc:
        raise NotFoundError(f"required program '{args[0]}' is not installed") from exc


def run_attached(argv: Sequence[str]) -> int:
    """Run *argv* on this terminal (stdin, stdout, stderr inherited) and return its exit
    status: `servers ssh` when it must read ssh's result. No timeout: the user's session
    lasts as long as they want; Ctrl-C reaches the child, as with exec."""
    args = [os.fspath(a) for a in argv]
    try:
        return subprocess.run(args, check=False).returncode
    except FileNotFoundError as exc:
        raise NotFoundError(f"required program '{args[0]}' is not installed") from exc


def spawn_detached(argv: Sequence[str | os.PathLike[str]], *, log_path: Path,
                   pass_fds: Sequence[int] = (), cwd: str | None = None) -> int:
    """Start a background worker in its own session, detached from the terminal and the
    caller's pipes (so `$(bbsnap ...)` returns at once), in *cwd* (default: this process's
    working directory); returns its pid."""
    args = [os.fspath(a) for a in argv]
    # 0600: a worker's log names what it copies and quotes libvirt's errors; others keep out.
    with open(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600),
              "ab") as log:
        child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True, pass_fds=tuple(pass_fds),
                                 close_fds=True, cwd=cwd)
    return child.pid


def fork_detached(work: Callable[[], int], *, log_path: Path,
                  keep_fds: Sequence[int] = ()) -> int:
    """Run *work* in a detached child of this process, in its own session, and return the
    child's pid at once; the child's exit status is what *work* returns.

    A fork, not an exec: the child already has everything imported (a new interpreter
    with bbsnap's imports took ~250 ms on this host, the whole of a small snapshot's
    time until available). The caller must have closed what cannot cross a fork (its
    libvirt connection, its SQLite one) and must not use what the child inherited but
    does not own. One fork, not the daemon's two: the second cost the command 10-20 ms
    here (the middle process must be scheduled, fork and exit); a `bbsnap` command exits
    right after, and a long-lived caller reaps its finished workers at the next call,
    while a worker not yet reaped is a zombie that process_tokens counts as dead.
    The child's output goes to *log_path* (0600); its pipes and sockets other than
    *keep_fds* are closed, so `$(bbsnap ...)` returns at once (regular files stay open:
    Python objects the child inherited may still close them, and a number closed here
    could by then name a file the child opened).
    """
    _reap_forked()
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            _run_worker(work, log, keep_fds)
    finally:
        os.close(log)
    _forked.add(pid)
    return pid


_forked: set[int] = set()  # this process's detached workers, not yet reaped


def _reap_forked() -> None:
    for pid in list(_forked):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid  # reaped by someone else
        if done:
            _forked.discard(pid)


def _run_worker(work: Callable[[], int], log: int,
                keep_fds: Sequence[int]) -> None:  # pragma: no cover - a child process
    import gc
    import stat
    import traceback

    # Nothing the caller left for its garbage collector is ever collected here: a libvirt
    # handle in such a cycle (a domain, holding its connection) would close its
    # connection when collected, an RPC over a socket number the loop below closes and
    # this child's own connection may take next; a worker forked by a process that had
    # one hung for good in that RPC (tests/system/test_forked_worker.py), holding the
    # server's lock. This child's own garbage is collected as usual.
    gc.freeze()
    status = 1
    try:
        os.setsid()  # no terminal's signals, no caller's process group
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        keep = {0, 1, 2, log, null, *keep_fds}
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd in keep:
                continue
            try:
                mode = os.fstat(fd).st_mode
            except OSError:
                continue  # the directory's own descriptor, already gone
            if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
                os.close(fd)
        status = work()  # it must not flush the caller's buffered output into the log
    except BaseException:
        try:
            os.write(log, traceback.format_exc().encode(errors="replace"))
        except BaseException:
            pass
    finally:
        os._exit(status)


def _set_parent_death_signal() -> None:
    import signal

    set_parent_death_signal(signal.SIGTERM)


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send this process *signum* when its parent dies (0: never)."""
    _PR_SET_PDEATHSIG = 1
    libc().prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


_loaded_libc: list[Any] = []


def libc() -> Any:
    """The C library through ctypes, loaded once per process (for the calls Python's os
    lacks: prctl, fallocate's flags, sync_file_range; a forking server loads it before it
    forks)."""
    if not _loaded_libc:
        import ctypes

        _loaded_libc.append(ctypes.CDLL(None, use_errno=True))
    return _loaded_libc[0]


def kill_child(pid: int) -> None:
    """End a child of this process at once (SIGKILL) and reap it; nothing if it is gone."""
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def fork_managed() -> int:
    """os.fork for a caller that manages its children itself (the command server's spares,
    bbsnap/cmdserver/server.py): 0 in the child, the child's pid in the parent. Unlike
    fork_detached, the child keeps the session, descriptors and output it inherits."""
    return os.fork()
