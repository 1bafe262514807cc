"""`doctor` finds raw memory saves left in RAM (/dev/shm/bbsnap-UID) that no job will store,
and `doctor --fix` deletes them outright (guest memory is never quarantined onto disk); a
live job's file, another data directory's and a planted symlinked directory are left alone.

The RAM directory is a real directory under the test's tmp dir (layout.RAM_ROOT pointed
there: the CLI runs in-process); libvirt's test driver is the connection (doctor's libvirt
checks only), as in test_doctor_safety.py.
"""

from __future__ import annotations

from pathlib import Path


from bbsnap.models import Image, ImageStatus, ImageType
from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.state.layout import DataDir
from bbsnap.state.process_tokens import current_job_token

OTHER = "test:///default"



def _rows(bbsnap, *images: tuple[str, ImageStatus, str | None]) -> None:
    assert bbsnap("images", "list").exit_code == 0  # the data directory and its catalogue
    catalogue = Catalogue(bbsnap.data_dir / "catalogue.sqlite3")
    try:
        for image_id, status, job in images:
            catalogue.add(Image(id=image_id, type=ImageType.SNAPSHOT, owner="me",
                                created_at=utcnow(), status=status, name=image_id, job=job))
    finally:
        catalogue.close()


def _save(data: DataDir, image_id: str) -> Path:
    assert data.ensure_ram_dir() is not None
    path = data.ram_file(f"{image_id}.memory.save")
    path.write_bytes(b"guest memory" * 1024)
    return path


def _line(output: str, check: str) -> str:
    return next(x for x in output.splitlines() if f" {check} " in x)


def test_orphaned_saves_in_ram_are_reported_then_deleted_not_quarantined(bbsnap, shm,
                                                                         work_dir):
    # The image finished (its file should have gone with it), a row gone entirely, and a
    # live snapshot's save (this process is the job: the CLI runs in it).
    _rows(bbsnap, ("img-avail", ImageStatus.AVAILABLE, None),
          ("img-livej", ImageStatus.CREATING, current_job_token()))
    data = DataDir(bbsnap.data_dir)
    orphans = [_save(data, "img-avail"), _save(data, "img-norow")]
    live = _save(data, "img-livej")
    theirs = _save(DataDir(work_dir / "other-data"), "img-norow")  # another data directory
    held = sum(p.stat().st_blocks * 512 for p in orphans)

    report = bbsnap("-c", OTHER, "doctor")
    line = _line(report.stdout, "orphaned RAM files")
    assert line.startswith("FAIL") and report.exit_code == 1
    assert f"2 raw memory saves hold {held} bytes" in line and str(data.ram_dir) in line
    assert "fix: bbsnap doctor --fix (deletes them: guest memory is never moved onto disk)" \
        in report.stdout
    assert all(p.exists() for p in [*orphans, live, theirs])  # a report changes nothing

    fixed = bbsnap("-c", OTHER, "doctor", "--fix")
    assert not any(p.exists() for p in orphans)
    assert live.exists() and theirs.exists()
    for path in orphans:
        assert f"deleted from RAM {path}: " in fixed.stderr
    assert (f"deleted 2 orphaned raw memory saves from RAM, freed {held} bytes" in fixed.stderr
            and "never quarantined onto disk" in fixed.stderr), fixed.stderr
    quarantine = bbsnap.data_dir / "quarantine"
    assert not quarantine.exists() or not [p for p in quarantine.rglob("*") if p.is_file()]
    assert _line(fixed.stdout, "orphaned RAM files").startswith("ok")
    assert "none" in _line(bbsnap("-c", OTHER, "doctor").stdout, "orphaned RAM files")


def test_a_symlinked_ram_dir_is_not_followed_nor_made(bbsnap, shm, work_dir):
    _rows(bbsnap, ("img-avail", ImageStatus.AVAILABLE, None))
    data = DataDir(bbsnap.data_dir)
    report = bbsnap("-c", OTHER, "doctor", "--fix")  # no RAM directory: none made
    assert "none" in _line(report.stdout, "orphaned RAM files")
    assert not data.ram_dir.exists()

    elsewhere = work_dir / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    planted = elsewhere / data.ram_file("img-avail.memory.save").name  # an orphan's name
    planted.write_bytes(b"not bbsnap's")
    data.ram_dir.symlink_to(elsewhere)
    fixed = bbsnap("-c", OTHER, "doctor", "--fix")
    line = _line(fixed.stdout, "orphaned RAM files")
    assert line.startswith("warn") and f"{data.ram_dir} not read: it is a symlink" in line
    assert planted.read_bytes() == b"not bbsnap's" and "from RAM" not in fixed.stderr
