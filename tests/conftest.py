"""Shared fixtures: isolated data directories, a CLI runner, and test-made files.

Every test gets its own data directory under a session root that QEMU's user
can traverse (pytest's own tmp dirs are 0700), removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from bbsnap.cli.main import cli
from bbsnap.state import layout
from bbsnap.state.layout import DataDir

# The tests' `bbsnap` commands never start a command server by themselves (run at a terminal,
# one would be left running): tests of cmdserver/autostart.py set the mode they test.
os.environ["BBSNAP_COMMAND_SERVER"] = "manual"


@pytest.fixture(scope="session")
def test_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="bbsnap-tests-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    # The user's RAM work directories (memory snapshots' saves, full copies QEMU writes).
    rams = (DataDir(root).ram_dir, DataDir(root).qemu_ram_dir)
    before = {ram: set(ram.iterdir()) if ram.is_dir() else None for ram in rams}
    yield root
    shutil.rmtree(root, ignore_errors=True)
    for ram in rams:
        if ram.is_dir():  # what the session's data directories left there (none should)
            for path in set(ram.iterdir()) - (before[ram] or set()):
                path.unlink(missing_ok=True)
            if before[ram] is None:
                with contextlib.suppress(OSError):  # another session's files in it meanwhile
                    ram.rmdir()


@pytest.fixture()
def work_dir(test_root: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=request.node.name[:40] + "-", dir=test_root))
    os.chmod(path, 0o755)
    yield path
    for left in DataDir(path / "data").ram_files():
        left.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def data_dir(work_dir: Path) -> Path:
    return work_dir / "data"


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


class Bbsnap:
    """Runs bbsnap commands against one data directory, in-process (fast) or as a process."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = {"BBSNAP_HOME": str(data_dir), "BBSNAP_CONFIG": "", **(env or {})}

    def __call__(self, *args: str, input: bytes | str | None = None,
                 env: dict[str, str] | None = None) -> CliResult:
        runner = CliRunner()
        result = runner.invoke(cli, list(args), input=input, env={**self.env, **(env or {})},
                               catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr)

    def process(self, *args: str, stdin: bytes | None = None,
                env: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
        full_env = {**os.environ, **self.env, **(env or {})}
        done = subprocess.run([sys.executable, "-m", "bbsnap.cli.main", *args], input=stdin,
                              capture_output=True, env=full_env, timeout=timeout, check=False)
        return CliResult(done.returncode, done.stdout.decode(), done.stderr.decode())

    def rows(self) -> int:
        """Catalogue rows of any status (0 when the catalogue does not exist yet)."""
        db = self.data_dir / "catalogue.sqlite3"
        if not db.exists():
            return 0
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT count(*) FROM images").fetchone()[0])

    def files(self) -> list[Path]:
        """Every file in the data directory except the catalogue's own."""
        if not self.data_dir.exists():
            return []
        return sorted(p for p in self.data_dir.rglob("*")
                      if p.is_file() and not p.name.startswith("catalogue.sqlite3"))


@pytest.fixture()
def bbsnap(data_dir: Path) -> Bbsnap:
    return Bbsnap(data_dir)


@pytest.fixture()
def shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /dev/shm (sticky, open to all) under the test's tmp dir: the RAM work
    directory (DataDir.ram_dir) is made and looked for there."""
    root = tmp_path / "shm"
    root.mkdir(mode=0o1777)
    monkeypatch.setattr(layout, "RAM_ROOT", str(root))
    return root
