"""The command server (bbsnap/cmdserver): `bbsnap` commands run in a fork of a pre-imported
server process, exactly as they would in their own, and nothing is handed to a server that
is not this user's and this install's. Real processes throughout (tests/command_server.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.command_server import ENTRY, Server, children, started, wait_gone
from tests.conftest import Bbsnap


@pytest.fixture()
def runtime(tmp_path: Path) -> Path:
    path = tmp_path / "runtime"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture()
def server(bbsnap: Bbsnap, runtime: Path) -> Iterator[Server]:
    with started(bbsnap, runtime) as srv:
        yield srv


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
                 ("images", "show", "nope"), ("images", "show", os.fsdecode(b"\xff"))):
        through, own = server.entry(*args), server.own_process(*args)
        assert through.returncode == own.returncode != 0
        assert through.stderr == own.stderr
        assert through.stderr.count(b"\n") <= 4


def test_working_directory_stdin_and_environment_are_the_callers(server: Server,
                                                                 tmp_path: Path) -> None:
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
    elsewhere = server.entry("images", "list", BBSNAP_HOME=str(tmp_path / "other-data"))
    assert elsewhere.returncode == 0 and b"relative" not in elsewhere.stdout


def test_ssh_runs_in_its_own_process(server: Server) -> None:
    """`servers ssh` execs ssh on the terminal: never in the server's child, whose exec
    would leave the waiting `bbsnap` to end while ssh still reads the terminal."""
    before = server.served()
    for args in (("servers", "ssh", "srv-nope0"),
                 ("--data-dir", str(server.bbsnap.data_dir), "servers", "ssh",
                  "srv-nope0", "--", "true")):
        done = server.entry(*args)
        assert done.returncode == 3, done.stderr  # not found, said by its own process
    assert server.served() == before + 1  # only this question went through
    assert server.entry("servers", "show", "srv-nope0").returncode == 3
    assert server.served() == before + 3  # that one did, and the two questions


def test_the_request_carries_the_callers_process_state(tmp_path: Path) -> None:
    """What session._become applies, as the client encodes it: umask, directory, groups,
    arguments (undecodable bytes too) and environment."""
    code = ("import os, sys; os.umask(0o027); os.chdir(sys.argv[1]); "
            "from bbsnap.cmdserver import protocol; "
            "sys.stdout.buffer.write(protocol.encode('run', '/pkg', sys.argv[2:]))")
    argv = ["servers", "show", os.fsdecode(b"\xff-name"), "a=b"]
    encoded = subprocess.run([sys.executable, "-c", code, str(tmp_path), *argv],
                             env={**os.environ, "BBSNAP_PROBE": "x=y"}, capture_output=True,
                             check=True).stdout
    from bbsnap.cmdserver import protocol, request as requests

    length = requests.payload_length(encoded[:protocol.HEADER_LEN])
    request = requests.decode(encoded[protocol.HEADER_LEN:])
    assert length == len(encoded) - protocol.HEADER_LEN
    assert (request.kind, request.package_dir, request.cwd, request.umask) == \
        ("run", "/pkg", str(tmp_path), 0o027)
    assert list(request.argv) == argv
    assert set(request.groups) == set(os.getgroups())
    assert ("BBSNAP_PROBE", "x=y") in request.environ
    for bad in (b"zzzzzzzz", b"%08x" % (protocol.MAX_REQUEST + 1)):
        with pytest.raises(ValueError):
            requests.payload_length(bad)
    with pytest.raises(ValueError):
        requests.decode(b"run\0/pkg")


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
        wait_gone(command)
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
        wait_gone(command)
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
        for child in children(pid):
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
        spare = children(pid)
        os.kill(pid, signal.SIGKILL)  # its socket stays behind; its spare dies with it
        wait_gone(pid)
        for child in spare:
            wait_gone(child)
        assert srv.entry("images", "list").returncode == 0  # in its own process
        assert srv.own_process("command-server", "start", "--idle-timeout", "0").returncode == 0
        pid = srv.pid()
        assert srv.served() >= 0
        # stop returns once the server has let go (socket removed, lock released): a start
        # right after starts a new one
        assert srv.own_process("command-server", "stop").returncode == 0
        assert not list(srv.dir.glob("*.sock"))
        assert srv.own_process("command-server", "start", "--idle-timeout", "0").returncode == 0
        wait_gone(pid)
        pid = srv.pid()
    finally:
        srv.own_process("command-server", "stop")
        wait_gone(pid)
    assert not list(srv.dir.glob("*.sock"))
    assert srv.own_process("command-server", "status").returncode == 3


def test_it_ends_when_idle(bbsnap: Bbsnap, runtime: Path) -> None:
    srv = Server(bbsnap, runtime)
    assert srv.own_process("command-server", "start", "--idle-timeout", "1").returncode == 0
    pid = srv.pid()
    wait_gone(pid)
    assert srv.own_process("command-server", "status").returncode == 3
    assert not list(srv.dir.glob("*.sock"))


@pytest.mark.parametrize("behaviour", ["reset", "garbage", "silent-close"])
def test_a_broken_server_never_stops_the_command(bbsnap: Bbsnap, runtime: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 behaviour: str) -> None:
    """Whatever a listener at the socket does before it says the command started (resets
    the connection, as a server stopped with the request still queued does; answers
    nonsense; closes), the command runs in its own process, once."""
    import socket
    import threading

    from bbsnap.cmdserver import paths

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    (runtime / "bbsnap").mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(paths.socket_path())
    listener.listen(1)

    accepted: list[bool] = []

    def serve_once() -> None:
        conn, _ = listener.accept()
        accepted.append(True)
        if behaviour == "reset":  # closed with the request unread: the client's read fails
            conn.recv(1 << 20, socket.MSG_PEEK)
        else:
            conn.recv(1 << 20)
        if behaviour == "garbage":
            conn.sendall(b"pid not-a-number\n")
        conn.close()

    thread = threading.Thread(target=serve_once)
    thread.start()
    try:
        srv = Server(bbsnap, runtime)
        done = srv.entry("images", "list", "--format", "json")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == b"[]" and done.stderr == b"", done.stderr
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # no accept() left waiting if nobody came
        thread.join(timeout=30)
        listener.close()
    assert accepted  # the client did hand its command to the listener first


def test_a_server_that_cannot_start_is_one_line_and_leaves_nothing_running(
        bbsnap: Bbsnap, runtime: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its lock held by someone else (no socket answers): `start` says why, in one line."""
    import fcntl

    from bbsnap.cmdserver import paths

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    (runtime / "bbsnap").mkdir(mode=0o700)
    with open(paths.lock_path(), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        srv = Server(bbsnap, runtime)
        done = srv.own_process("command-server", "start")
    assert done.returncode == 1
    assert done.stderr.count(b"\n") == 1
    assert b"did not start" in done.stderr and b"already running" in done.stderr
    assert not list((runtime / "bbsnap").glob("*.sock"))
    assert srv.own_process("command-server", "status").returncode == 3


# -- started by an interactive command (cmdserver/autostart.py) ------------------------------

def _at_terminal(srv: Server, *args: str, **extra: str) -> subprocess.CompletedProcess[bytes]:
    """`bbsnap ARGS` as typed at a terminal: standard input and error a pty, output captured."""
    import pty

    master, slave = pty.openpty()
    try:
        return subprocess.run([*ENTRY, *args], stdin=slave, stdout=subprocess.PIPE,
                              stderr=slave, env={**srv.env, **extra}, timeout=120, check=False)
    finally:
        os.close(slave)
        os.close(master)


def _servers_in(runtime: Path) -> list[int]:
    """The command server processes whose runtime directory is *runtime* (not their
    spares: forks of theirs, alike in all but the parent)."""
    found: dict[int, int] = {}
    wanted = f"XDG_RUNTIME_DIR={runtime}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue  # ended meanwhile, or not ours to read
        if b"bbsnap.cmdserver.server" in cmdline and wanted in environ:
            found[int(entry.name)] = parent
    return sorted(pid for pid, parent in found.items() if parent not in found)


def _end(pids: list[int]) -> None:
    """SIGTERM each server (a started one ends its loop; one still importing dies) and wait
    for it and the spare it had."""
    for pid in pids:
        spare = children(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
        for child in spare:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            wait_gone(child)


def test_a_command_at_a_terminal_starts_a_server_for_the_next(bbsnap: Bbsnap,
                                                               runtime: Path) -> None:
    srv = Server(bbsnap, runtime)
    first = _at_terminal(srv, "images", "list", "--format", "json")
    pids = _servers_in(runtime)  # spawned before the command's process ended
    try:
        assert first.returncode == 0 and first.stdout.strip() == b"[]"
        assert len(pids) == 1
        deadline = time.monotonic() + 120
        while not srv.info():  # it imports everything first (~1 s here)
            assert time.monotonic() < deadline, "the started server never answered"
            time.sleep(0.05)
        assert int(srv.info()["pid"]) == pids[0]
        before = srv.served()
        through = srv.entry("images", "list", "--format", "json")
        assert (through.returncode, through.stdout) == (0, first.stdout)
        assert srv.served() == before + 2  # the list, then the question
        # Another command at the terminal goes to it and starts no second one.
        assert _at_terminal(srv, "images", "list").returncode == 0
        assert _servers_in(runtime) == pids
    finally:
        _end(_servers_in(runtime))


@pytest.mark.parametrize("terminal,mode,args", [
    (False, None, ("images", "list")),  # a script, a cron job, CI
    (True, "manual", ("images", "list")),
    (True, "off", ("images", "list")),
    (True, None, ("command-server", "status")),  # managing the server starts none
    (True, None, ("--version",)),
])
def test_no_server_is_started_unless_at_a_terminal_in_auto_mode(
        bbsnap: Bbsnap, runtime: Path, terminal: bool, mode: str | None,
        args: tuple[str, ...]) -> None:
    srv = Server(bbsnap, runtime)
    extra = {"BBSNAP_COMMAND_SERVER": mode} if mode else {}
    done = _at_terminal(srv, *args, **extra) if terminal else srv.entry(*args, **extra)
    left = _servers_in(runtime)
    _end(left)
    assert done.returncode in (0, 3)  # status: 3, none runs
    assert left == []


def test_a_server_started_in_a_directory_never_imports_from_it(bbsnap: Bbsnap, runtime: Path,
                                                               tmp_path: Path) -> None:
    """`python -m` would put the working directory first on the path: a server started (by
    hand or by a command typed there) where a `click.py` lies would import it."""
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "click.py").write_text("raise SystemExit('the directory\\'s click was imported')\n")
    (trap / "libvirt.py").write_text("raise SystemExit('the directory\\'s libvirt was imported')\n")
    srv = Server(bbsnap, runtime)
    # The client as the installed launcher runs it (isolated, the package named): only the
    # server it starts could find the directory's modules.
    import bbsnap as package

    launcher = [sys.executable, "-I", "-c", "import sys; sys.path.insert(0, "
                f"{str(Path(package.__file__).parent.parent)!r}); "
                "from bbsnap.entry import main; main()"]

    def typed_in_trap(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*launcher, *args], capture_output=True, cwd=trap, env=srv.env,
                              timeout=120, check=False)

    done = typed_in_trap("command-server", "start", "--idle-timeout", "0")
    assert done.returncode == 0, done.stderr
    pid = srv.pid()
    try:
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        listed = typed_in_trap("images", "list", "--format", "json")
        assert (listed.returncode, listed.stdout.strip()) == (0, b"[]")
        assert srv.served() >= 2
    finally:
        srv.own_process("command-server", "stop")
        wait_gone(pid)
