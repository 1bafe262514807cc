"""Who can read the data directory (real qemu-img, real files, `nobody` as a real second
process): images, the catalogue and its WAL, locks and logs are their owner's; directories
let QEMU's user through and nobody else; an older data directory is tightened, never
loosened."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
from pathlib import Path

from bbsnap import proc
from bbsnap.state import locks
from bbsnap.state.catalogue import Catalogue
from bbsnap.state.layout import DataDir
from tests.images import qcow2_disk
from tests.other_user import PYTHON, as_nobody

QEMU_GROUP = grp.getgrnam("libvirt-qemu").gr_gid  # QEMU's user's own group on Debian
SHARED = ("", "images", "servers", "tmp")          # QEMU opens disks below these
PRIVATE = ("locks", "logs", "blank-overlays")      # QEMU never does
REPO = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_what_bbsnap_makes_is_private(bbsnap, work_dir):
    source = qcow2_disk(work_dir / "disk.qcow2")
    os.chmod(source, 0o600)  # a root-only file: importing it must not publish it
    imported = bbsnap("images", "import", str(source), "--name", "secret")
    assert imported.exit_code == 0, imported.stderr
    data = DataDir(bbsnap.data_dir)
    image = data.image_file(imported.stdout.strip())
    with locks.acquire(data.locks_dir, "0c4b6f1e-2a39-4a8e-9d6c-3d0f5d0e9a11") as lock, \
            locks.acquire_path(data.servers_dir / ".allocate.lock"):
        proc.spawn_detached([sys.executable, "-c", "print('worker')"],
                            log_path=data.logs_dir / "img-aaaaa.log")
        catalogue = Catalogue(data.catalogue_path)  # open: its -wal and -shm exist
        try:
            files = [data.catalogue_path, Path(f"{data.catalogue_path}-wal"),
                     Path(f"{data.catalogue_path}-shm"), image, lock.path,
                     data.servers_dir / ".allocate.lock", data.logs_dir / "img-aaaaa.log"]
            for path in files:
                assert mode(path) == 0o600, f"{path} is {oct(mode(path))}"
            for name in SHARED:
                assert mode(data.root / name) == 0o710
                assert os.stat(data.root / name).st_gid == QEMU_GROUP
            for name in PRIVATE:
                assert mode(data.root / name) == 0o700
            verdicts = as_nobody(files + [data.root / n for n in SHARED + PRIVATE])
        finally:
            catalogue.close()
    assert set(verdicts.values()) == {"denied"}, verdicts


def test_a_server_directory_is_entered_by_qemu_only(tmp_path):
    data = DataDir(tmp_path / "data").ensure()
    data.make_dir(data.server_dir("srv-abcde"))
    assert mode(data.server_dir("srv-abcde")) == 0o710
    assert os.stat(data.server_dir("srv-abcde")).st_gid == QEMU_GROUP


def _older_data_dir(root: Path) -> dict[str, Path]:
    """The layout an older bbsnap left: every directory 0755, every file 0644."""
    made = {}
    for name in (*SHARED, *PRIVATE, "servers/srv-abcde"):
        (root / name).mkdir(parents=True, exist_ok=True)
        os.chmod(root / name, 0o755)
    Catalogue(root / "catalogue.sqlite3").close()
    os.chmod(root / "catalogue.sqlite3", 0o644)
    made["catalogue.sqlite3"] = root / "catalogue.sqlite3"
    for name in ("images/img-abcde.qcow2",
                 "servers/srv-abcde/disk.qcow2", "servers/.allocate.lock",
                 "locks/0c4b6f1e.lock", "logs/img-abcde.log", "blank-overlays/img-abcde-1.qcow2"):
        (root / name).write_bytes(b"guest data")
        os.chmod(root / name, 0o644)
        made[name] = root / name
    return made


def test_an_older_data_directory_is_tightened_by_the_next_command(bbsnap):
    files = _older_data_dir(bbsnap.data_dir)
    assert as_nobody([files["images/img-abcde.qcow2"]]) == {files["images/img-abcde.qcow2"]: "read"}

    assert bbsnap("images", "list").exit_code == 0

    for path in files.values():
        assert mode(path) == 0o600, f"{path} is {oct(mode(path))}"
    for name in (*SHARED, "servers/srv-abcde"):
        assert mode(bbsnap.data_dir / name) == 0o710, name  # QEMU keeps its way in
    for name in PRIVATE:
        assert mode(bbsnap.data_dir / name) == 0o700, name
    assert set(as_nobody(list(files.values())).values()) == {"denied"}


def test_existing_directories_are_never_loosened(bbsnap):
    root = bbsnap.data_dir
    for name in SHARED + PRIVATE:
        (root / name).mkdir(parents=True, exist_ok=True)
        os.chmod(root / name, 0o700)  # the owner's choice (QEMU cannot enter: doctor says so)
    os.chmod(root / "logs", 0o750)    # its group may list it: that is taken, its x is kept
    (root / "tmp" / "work").write_bytes(b"x")
    os.chmod(root / "tmp" / "work", 0o644)  # where nobody else can get: not walked to

    assert bbsnap("images", "list").exit_code == 0

    for name in SHARED + ("locks", "blank-overlays"):
        assert mode(root / name) == 0o700, name
    assert mode(root / "logs") == 0o700
    assert mode(root / "tmp" / "work") == 0o644


def test_the_catalogue_is_created_private_and_an_older_one_tightened(tmp_path):
    data = DataDir(tmp_path / "data").ensure()
    assert mode(data.catalogue_path) == 0o600
    catalogue = Catalogue(data.catalogue_path)
    try:
        assert mode(Path(f"{data.catalogue_path}-wal")) == 0o600  # SQLite copies the mode
    finally:
        catalogue.close()
    os.chmod(data.catalogue_path, 0o644)
    DataDir(tmp_path / "data").ensure()
    assert mode(data.catalogue_path) == 0o600


def test_a_user_who_cannot_give_the_group_away_gets_0711(work_dir):
    """Not root (qemu:///session, or a user with the libvirt socket): chgrp to QEMU's group
    is refused, so QEMU's directories are 0711: traversable, never listable."""
    os.chown(work_dir, 65534, -1)  # nobody's own directory to make the data dir in
    script = ("import sys; from pathlib import Path; from bbsnap.state.layout import DataDir; "
              "DataDir(Path(sys.argv[1])).ensure()")
    subprocess.run(["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={REPO}", PYTHON,
                    "-c", script, str(work_dir / "data")], check=True, timeout=60, cwd="/")
    for name in SHARED:
        assert mode(work_dir / "data" / name) == 0o711, name
    for name in PRIVATE:
        assert mode(work_dir / "data" / name) == 0o700, name
    assert mode(work_dir / "data" / "catalogue.sqlite3") == 0o600


def test_preparing_the_data_directory_keeps_this_processs_catalogue_locks(work_dir):
    """DataDir.ensure() while this process has the catalogue open (a second command run
    in-process, a worker's own set-up) must not open and close the catalogue file: closing
    any descriptor drops this process's POSIX locks, SQLite's included, and the next process
    to close its connection then deletes the WAL under ours (a `--wait` read the deleted WAL
    and waited forever)."""
    import sqlite3
    import subprocess
    import sys

    from bbsnap.state.layout import DataDir

    data_dir = DataDir(work_dir / "data").ensure()
    ours = sqlite3.connect(data_dir.catalogue_path, isolation_level=None)
    ours.execute("PRAGMA journal_mode = WAL")
    ours.execute("CREATE TABLE t (x INTEGER)")
    ours.execute("INSERT INTO t VALUES (1)")
    data_dir.ensure()

    def other_process_sets(value: int) -> None:
        code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
                f"c.execute('UPDATE t SET x = {value}'); c.close()")
        subprocess.run([sys.executable, "-c", code, str(data_dir.catalogue_path)], check=True)

    other_process_sets(2)
    # Our connection still holds the WAL: the other process, closing, must not take itself
    # for the last one and delete it (it did once ensure() had closed a descriptor).
    assert Path(f"{data_dir.catalogue_path}-wal").exists()
    other_process_sets(3)
    assert ours.execute("SELECT x FROM t").fetchone() == (3,)
    ours.close()
