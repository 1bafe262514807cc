"""The command server as tests drive it: started as `command-server start` starts it, in a
runtime directory of the test's own (XDG_RUNTIME_DIR: never a server of the machine's
user), commands through the console script's own entry point (bbsnap.entry)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import Bbsnap

ENTRY = [sys.executable, "-c", "from bbsnap.entry import main; main()"]


class Server:
    def __init__(self, bbsnap: Bbsnap, runtime: Path, **env: str) -> None:
        self.bbsnap = bbsnap
        self.env = {**os.environ, **bbsnap.env, "XDG_RUNTIME_DIR": str(runtime), **env}
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


def wait_gone(pid: int, timeout: float = 30) -> None:
    """Until *pid* has ended (it is not ours to wait for: poll its /proc entry)."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"process {pid} did not end")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except FileNotFoundError:
        return []


def kill_children_of(pid: int) -> None:
    for child in children(pid):
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def started(bbsnap: Bbsnap, runtime: Path, **env: str) -> Iterator[Server]:
    """A started server for *bbsnap*'s commands; at the end it is stopped and every
    process it made has ended."""
    srv = Server(bbsnap, runtime, **env)
    done = srv.own_process("command-server", "start", "--idle-timeout", "0")
    assert done.returncode == 0, done.stderr
    pid = srv.pid()
    try:
        yield srv
    finally:
        srv.own_process("command-server", "stop")
        wait_gone(pid)
        kill_children_of(pid)
