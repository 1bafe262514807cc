"""qemu-nbd's socket directory (disks/nbd.py): private while a reader runs, gone when it
closes, and one left by a killed process removed by the next reader, never anyone else's.
Real qemu-nbd; the temporary directory is the test's own (TMPDIR)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bbsnap.disks import nbd
from bbsnap.errors import ExternalCommandError
from bbsnap.state.process_tokens import current_job_token
from tests.images import MIB, qcow2_disk

# A process that opens a reader, says where its directory is, then waits to be killed.
HOLDER = ("import sys, time; from pathlib import Path; from bbsnap.disks import nbd; "
          "r = nbd.NbdImageReader(Path(sys.argv[1]), 'qcow2'); "
          "print(r._dir, flush=True); time.sleep(600)")


@pytest.fixture()
def tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short one (a socket's path must stay under 108 bytes), removed at the end; made
    after pytest's own tmp_path, which would otherwise be made in it."""
    base = Path(tempfile.mkdtemp(prefix="nbdt-", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(base))
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_directory_is_private_while_read_and_gone_after(tmp: Path, tmp_path: Path) -> None:
    disk = qcow2_disk(tmp_path / "d.qcow2", 2 * MIB)
    with nbd.NbdImageReader(disk, "qcow2") as reader:
        (made,) = list(tmp.iterdir())
        assert made.name.startswith(f"{nbd.SOCKET_DIR_PREFIX}{os.getuid()}.{current_job_token()}.")
        assert stat.S_IMODE(made.stat().st_mode) == 0o700
        flat = tmp_path / "flat.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(flat)], check=True)
        assert b"".join(reader.read(0, 2 * MIB)) == flat.read_bytes()
    assert list(tmp.iterdir()) == []


def test_a_killed_readers_directory_is_removed_by_the_next(tmp: Path, tmp_path: Path) -> None:
    disk = qcow2_disk(tmp_path / "d.qcow2", 2 * MIB)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(disk)], stdout=subprocess.PIPE,
                              env={**os.environ, "TMPDIR": str(tmp)}, text=True)
    try:
        left = Path(holder.stdout.readline().strip())  # type: ignore[union-attr]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert left.is_dir()  # SIGKILL: nothing could remove it
    # Dead tokens' directories that are not ours alone stay: a symlink, one open to others.
    dead = f"{nbd.SOCKET_DIR_PREFIX}{os.getuid()}.1:1:deadbeef."
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp / f"{dead}link").symlink_to(elsewhere)
    (tmp / f"{dead}open").mkdir(mode=0o755)
    os.chmod(tmp / f"{dead}open", 0o755)
    live = tmp / f"{nbd.SOCKET_DIR_PREFIX}{os.getuid()}.{current_job_token()}.cafe0000"
    live.mkdir(mode=0o700)
    with nbd.NbdImageReader(disk, "qcow2"):
        pass
    assert not left.exists()
    assert sorted(p.name for p in tmp.iterdir()) == sorted([f"{dead}link", f"{dead}open",
                                                            live.name])
    assert elsewhere.is_dir()


def test_a_reader_that_cannot_start_leaves_nothing(tmp: Path, tmp_path: Path) -> None:
    (tmp_path / "not-an-image.qcow2").write_bytes(b"nothing")
    with pytest.raises(ExternalCommandError):
        nbd.NbdImageReader(tmp_path / "not-an-image.qcow2", "qcow2")
    assert list(tmp.iterdir()) == []


# A qemu-nbd that, like the real one with an image it cannot open, makes its socket first,
# then exits with a message while a connection waits unaccepted (the client's reads then
# meet a reset or an end of file, depending on timing).
EXITING_QEMU_NBD = """#!{python}
import socket, sys, time
path = [a for a in sys.argv if a.startswith("--socket=")][0].split("=", 1)[1]
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
listener.listen(1)
{wait}
sys.stderr.write("qemu-nbd: Failed to blk_new_open: Image is not in qcow2 format\\n")
sys.exit(1)
"""


@pytest.mark.parametrize("wait", ["time.sleep(0.2)",  # the client connected: a reset
                                  ""])  # at once: the socket may be found gone or dead
def test_a_qemu_nbd_exiting_at_start_is_its_own_message(tmp: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        wait: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qemu-nbd"
    fake.write_text(EXITING_QEMU_NBD.format(python=sys.executable, wait=wait))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    (tmp_path / "any.qcow2").write_bytes(b"x")
    with pytest.raises(ExternalCommandError, match="not in qcow2 format") as raised:
        nbd.NbdImageReader(tmp_path / "any.qcow2", "qcow2")
    if wait:
        assert isinstance(raised.value.__cause__, (ConnectionResetError, ExternalCommandError))
    assert list(tmp.iterdir()) == []
