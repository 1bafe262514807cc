"""The catalogue's main file alone holds every committed row (DESIGN §8), through the real
`bbsnap` process (its `os._exit` skips every close, so only these tests see the exit path)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from bbsnap.state.catalogue import Catalogue
from tests.images import MIB, raw_disk


def main_file_rows(catalogue: Path) -> list[tuple[str, str]]:
    """The rows in the main file alone: a copy of it, opened without its WAL."""
    copy = catalogue.with_name("copy-of-main-file.sqlite3")
    shutil.copyfile(catalogue, copy)
    try:
        with sqlite3.connect(copy) as db:
            return sorted(db.execute("SELECT id, status FROM images").fetchall())
    except sqlite3.DatabaseError:  # no such table (the schema too lived in the WAL), torn copy
        return []
    finally:
        copy.unlink()


def test_after_imports_the_main_file_alone_holds_every_row(bbsnap, work_dir):
    ids = []
    for n in range(3):
        result = bbsnap.process("images", "import", str(raw_disk(work_dir / f"{n}.raw")))
        assert result.exit_code == 0, result.stderr
        ids.append(result.stdout.strip())
    catalogue = bbsnap.data_dir / "catalogue.sqlite3"
    assert main_file_rows(catalogue) == sorted((i, "available") for i in ids)
    assert Path(f"{catalogue}-wal").stat().st_size == 0  # checkpointed and truncated
    # Hence deleting the "temporary" WAL loses nothing.
    Path(f"{catalogue}-wal").unlink()
    listed = bbsnap.process("images", "list", "-s")
    assert sorted(line.split("\t")[0] for line in listed.stdout.splitlines()) == sorted(ids)


def test_a_read_only_command_does_not_checkpoint(bbsnap, work_dir):
    assert bbsnap.process("images", "import", str(raw_disk(work_dir / "a.raw"))).exit_code == 0
    catalogue = bbsnap.data_dir / "catalogue.sqlite3"
    writer = Catalogue(catalogue)  # a commit of another process, left in the WAL
    image_id = writer.find()[0].id
    writer.update(image_id, description="changed")
    wal = Path(f"{catalogue}-wal").stat().st_size
    try:
        assert bbsnap.process("images", "list").exit_code == 0
        assert Path(f"{catalogue}-wal").stat().st_size == wal  # not its to pay for
    finally:
        writer.close()


def test_a_fresh_catalogue_beside_image_files_is_refused(bbsnap, work_dir):
    result = bbsnap.process("images", "import", str(raw_disk(work_dir / "a.raw")))
    catalogue = bbsnap.data_dir / "catalogue.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{catalogue}{suffix}").unlink(missing_ok=True)  # a catalogue lost
    listed = bbsnap.process("images", "list")
    assert listed.exit_code == 1 and listed.stdout == ""
    assert listed.stderr.count("\n") == 1, listed.stderr  # one line
    assert "missing or empty" in listed.stderr and "restore catalogue.sqlite3" in listed.stderr
    # Nothing was set up in its place (the data directory may pre-create it, empty and 0600).
    assert not catalogue.exists() or catalogue.stat().st_size == 0
    assert (bbsnap.data_dir / "images" / f"{result.stdout.strip()}.qcow2").exists()


def _slow_import(bbsnap, work_dir: Path) -> subprocess.Popen:
    """`images import -` fed its first MiB only: it has committed its `creating` row and
    waits for the rest of the disk."""
    source = raw_disk(work_dir / "slow.raw", size=16 * MIB).read_bytes()
    process = subprocess.Popen([sys.executable, "-m", "bbsnap.cli.main", "images", "import",
                                "-", "--name", "slow"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, **bbsnap.env})
    assert process.stdin is not None
    process.stdin.write(source[:MIB])
    process.stdin.flush()
    deadline = time.monotonic() + 30
    while not any((bbsnap.data_dir / "tmp").glob("img-*")):
        assert time.monotonic() < deadline and process.poll() is None, "the import did not start"
        time.sleep(0.02)
    process.feed = source[MIB:]  # type: ignore[attr-defined]
    return process


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(process.feed, timeout=60)  # type: ignore[attr-defined]
    return process.returncode, out.decode(), err.decode()


def test_an_import_whose_wal_was_deleted_mid_run_keeps_its_row(bbsnap, work_dir):
    first = bbsnap.process("images", "import", str(raw_disk(work_dir / "a.raw"))).stdout.strip()
    process = _slow_import(bbsnap, work_dir)
    Path(f"{bbsnap.data_dir}/catalogue.sqlite3-wal").unlink()
    code, out, err = _finish(process)
    assert code == 0, err
    # The import still held the deleted WAL open: its checkpoint copied it into the main file.
    rows = main_file_rows(bbsnap.data_dir / "catalogue.sqlite3")
    assert rows == sorted([(first, "available"), (out.strip(), "available")])


def test_an_import_whose_wal_was_replaced_mid_run_does_not_exit_0(bbsnap, work_dir):
    bbsnap.process("images", "import", str(raw_disk(work_dir / "a.raw")))
    process = _slow_import(bbsnap, work_dir)
    Path(f"{bbsnap.data_dir}/catalogue.sqlite3-wal").unlink()
    bbsnap.process("images", "list")  # another process starts a new WAL at the path
    code, out, err = _finish(process)
    image_id = out.strip()
    assert code != 0
    assert f"what it recorded ({image_id}) may be lost" in err, err
    assert "bbsnap doctor" in err
