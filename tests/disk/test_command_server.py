"""The command server (bbsnap/cmdserver): `bbsnap` commands run in a fork of a pre-imported
server process, exactly as they would in their own, and nothing is handed to a server that
is not this user's and this install's.

Real processes throughout: the server as `command-server start` starts it, commands through
the console script's own entry point (bbsnap.entry), in a runtime directory of the test's
own (XDG_RUNTIME_DIR), so no server of the machine's user is ever involved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Bbsnap

ENTRY = [sys.executable, "-c", "from bbsnap.entry import main; main()"]


class Server:
    def __init__(self, bbsnap: Bbsnap, runtime: Path) -> None:
        self.bbsnap = bbsnap
        self.env = {**os.environ, **bbsnap.env, "XDG_RUNTIME_DIR": str(runtime)}
        self.env.pop("BBSNAP_COMMAND_SERVER", None)
        self.dir = runtime / "bbsnap"

    def entry(self, *args: str, stdin: bytes | None = None, cwd: Path | None = None,
              **extra: str) -> subprocess.CompletedProcess[bytes]:
        """`bbsnap ARGS` as the console script runs it."""
        return subprocess.run([*ENTRY, *args], input=stdin, capture_output=True, cwd=cwd,
                              env={**self.env, **extra}, timeout=120, check=False)

    def own_process(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return self.entry(*args, BBSNAP_COMMAND_SERVER="off")

    def info(self) -> dict[str, str]:
        done = self.own_process("command-server", "status")
        if done.returncode != 0:
            return {}
        text = done.stdout.decode().split(": ", 1)[1]
        return dict(item.split("=", 1) for item in text.split())

    def served(self) -> int:
        """Connections the server had accepted before this question (which is one too)."""
        return int(self.info()["served"])

    def pid(self) -> int:
        return int(self.info()["pid"])


@pytest.fixture()
def runtime(tmp_path: Path) -> Path:
    path = tmp_path / "runtime"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture()
def server(bbsnap: Bbsnap, runtime: Path) -> Iterator[Server]:
    """A started server; at the end it is stopped and every process it made has ended."""
    srv = Server(bbsnap, runtime)
    started = srv.own_process("command-server", "start", "--idle-timeout", "0")
    assert started.returncode == 0, started.stderr
    pid = srv.pid()
    try:
        yield srv
    finally:
        srv.own_process("command-server", "stop")
        _wait_gone(pid)
        _kill_children_of(pid)


def _wait_gone(pid: int, timeout: float = 30) -> None:
    """Until *pid* has ended (it is not ours to wait for: poll its /proc entry)."""
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"process {pid} did not end")
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except FileNotFoundError:
        return []


def _kill_children_of(pid: int) -> None:
    for child in _children(pid):
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _disk(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    return path


def test_a_command_runs_in_the_server_as_in_its_own_process(server: Server, tmp_path: Path) -> None:
    before = server.served()
    through = server.entry("images", "list", "--format", "json")
    assert server.served() == before + 2  # the list, then this question
    own = server.own_process("images", "list", "--format", "json")
    assert (through.returncode, through.stdout, through.stderr) == \
        (own.returncode, own.stdout, own.stderr)
    assert through.returncode == 0


def test_errors_keep_their_message_and_exit_code(server: Server) -> None:
    for args in (("images", "show", "img-nope0"), ("images", "no-such-command"),
                 ("images", "show", "nope")):
        through, own = server.entry(*args), server.own_process(*args)
        assert through.returncode == own.returncode != 0
        assert through.stderr == own.stderr
        assert through.stderr.count(b"\n") <= 4


def test_working_directory_stdin_and_umask_are_the_callers(server: Server, tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    _disk(work / "disk.qcow2")
    before = server.served()
    by_name = server.entry("images", "import", "disk.qcow2", "--name", "relative", cwd=work)
    assert by_name.returncode == 0, by_name.stderr
    piped = server.entry("images", "import", "-", "--name", "piped",
                         stdin=_disk(tmp_path / "other.qcow2").read_bytes())
    assert piped.returncode == 0, piped.stderr
    assert server.served() == before + 3
    names = server.own_process("images", "list").stdout.decode()
    assert "relative" in names and "piped" in names
    exported = tmp_path / "out.raw"
    image = by_name.stdout.decode().split()[-1] if by_name.stdout.strip() else ""
    image = image or _image_named(server, "relative")
    done = subprocess.run(["sh", "-c", 'umask 077 && exec "$@"', "sh", *ENTRY, "images",
                           "export", image, "--format", "raw", "--output", str(exported)],
                          env=server.env, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert exported.stat().st_mode & 0o077 == 0


def _image_named(server: Server, name: str) -> str:
    for line in server.own_process("images", "list").stdout.decode().splitlines():
        if name in line.split():
            return line.split()[0]
    raise AssertionError(f"no image named {name}")


def test_interrupt_reaches_the_command(server: Server) -> None:
    """^C (SIGINT to the client) interrupts the command: exit 130, no image left creating."""
    feeder = subprocess.Popen(["sleep", "60"], stdout=subprocess.PIPE)
    try:
        client = subprocess.Popen([*ENTRY, "images", "import", "-", "--name", "stuck"],
                                  stdin=feeder.stdout, stderr=subprocess.PIPE, env=server.env)
        command = _command_child(server)
        os.kill(client.pid, signal.SIGINT)
        assert client.wait(timeout=60) == 130
        assert b"interrupted" in client.stderr.read()  # type: ignore[union-attr]
        _wait_gone(command)
    finally:
        feeder.kill()
        feeder.wait()
    assert "creating" not in server.own_process("images", "list").stdout.decode()


def test_a_killed_client_ends_its_command(server: Server) -> None:
    """SIGKILL of `bbsnap` ends the command at once, as in its own process; the next
    command recovers what it left."""
    feeder = subprocess.Popen(["sleep", "60"], stdout=subprocess.PIPE)
    try:
        client = subprocess.Popen([*ENTRY, "images", "import", "-", "--name", "killed"],
                                  stdin=feeder.stdout, stderr=subprocess.PIPE, env=server.env)
        command = _command_child(server)
        client.kill()
        client.wait()
        _wait_gone(command)
    finally:
        feeder.kill()
        feeder.wait()
    listing = server.entry("images", "list", "--all").stdout.decode()
    assert "creating" not in listing


def _command_child(server: Server, timeout: float = 60) -> int:
    """The server's child that is running a command: the one of its two children (the
    other is the spare) whose stdin is a pipe."""
    pid, deadline = server.pid(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in _children(pid):
            try:
                if os.readlink(f"/proc/{child}/fd/0").startswith("pipe:"):
                    return child
            except OSError:
                continue
        time.sleep(0.02)
    raise AssertionError("no command started in the server")


def test_changed_code_is_never_run(server: Server, runtime: Path) -> None:
    """A module changed on disk since the server imported it: the command runs in its own
    process (on the new code), and the server starts again from the new code."""
    import bbsnap.sizes

    module = Path(bbsnap.sizes.__file__)
    pid, info = server.pid(), module.stat()
    os.utime(module, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    try:
        before = server.served()
        done = server.entry("images", "list")
        assert done.returncode == 0
        deadline = time.monotonic() + 60
        while not server.info() or server.served() > before:  # the restarted one counts anew
            assert time.monotonic() < deadline, "the server did not start again"
            time.sleep(0.05)
    finally:
        os.utime(module, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert server.pid() == pid  # exec'd in place
    # back to the old time: that is a change too, and it is caught again
    assert server.entry("images", "list").returncode == 0


def test_a_directory_not_ours_is_never_used(bbsnap: Bbsnap, tmp_path: Path) -> None:
    for mode, owner in ((0o755, None), (0o700, 65534)):
        runtime = tmp_path / f"runtime-{mode:o}-{owner}"
        runtime.mkdir(mode=0o700)
        (runtime / "bbsnap").mkdir(mode=mode)
        os.chmod(runtime / "bbsnap", mode)
        if owner is not None:
            os.chown(runtime / "bbsnap", owner, owner)
        srv = Server(bbsnap, runtime)
        refused = srv.own_process("command-server", "start")
        assert refused.returncode == 1
        assert b"not to be trusted" in refused.stderr and refused.stderr.count(b"\n") == 1
        assert not list((runtime / "bbsnap").iterdir())
        assert srv.entry("images", "list").returncode == 0  # run in its own process


def test_status_start_stop_and_a_dead_server(bbsnap: Bbsnap, runtime: Path) -> None:
    srv = Server(bbsnap, runtime)
    assert srv.own_process("command-server", "status").returncode == 3
    assert srv.own_process("command-server", "stop").returncode == 0
    assert srv.own_process("command-server", "start", "--idle-timeout", "0").returncode == 0
    pid = srv.pid()
    try:
        again = srv.own_process("command-server", "start")
        assert again.returncode == 0 and f"pid={pid}".encode() in again.stdout
        spare = _children(pid)
        os.kill(pid, signal.SIGKILL)  # its socket stays behind; its spare dies with it
        _wait_gone(pid)
        for child in spare:
            _wait_gone(child)
        assert srv.entry("images", "list").returncode == 0  # in its own process
        assert srv.own_process("command-server", "start", "--idle-timeout", "0").returncode == 0
        pid = srv.pid()
        assert srv.served() >= 0
    finally:
        srv.own_process("command-server", "stop")
        _wait_gone(pid)
    assert not (srv.dir / (next(srv.dir.glob("*.sock")).name if list(srv.dir.glob("*.sock"))
                           else "none.sock")).exists()


def test_it_ends_when_idle(bbsnap: Bbsnap, runtime: Path) -> None:
    srv = Server(bbsnap, runtime)
    assert srv.own_process("command-server", "start", "--idle-timeout", "1").returncode == 0
    pid = srv.pid()
    _wait_gone(pid)
    assert srv.own_process("command-server", "status").returncode == 3
    assert not list(srv.dir.glob("*.sock"))
