"""Which raw memory saves in RAM are orphans (services/ram_reclaim.py), on real files in a
RAM directory under the test's own tmp dir (layout.RAM_ROOT pointed there)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bbsnap.models import Image, ImageStatus, ImageType, SnapshotDisk, SnapshotJob
from bbsnap.services import ram_reclaim
from bbsnap.services.reclaim import Orphan
from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.state.layout import DataDir
from bbsnap.state.process_tokens import boot_id, current_job_token

DEAD_JOB = f"{os.getpid()}:1:{boot_id()}"  # this pid with another start time: a dead job
JOB = SnapshotJob(domain="srv-aaaaa", domain_uuid="0b9d7c1e-0000-4000-8000-000000000001",
                  mode="memory", disks=(SnapshotDisk("vda", "/nonexistent/disk.qcow2", "qcow2",
                                                     "/nonexistent/target.qcow2"),))



@pytest.fixture()
def catalogue(tmp_path):
    opened = Catalogue(tmp_path / "catalogue.sqlite3")
    yield opened
    opened.close()


def _image(image_id: str, status: ImageStatus, job: str | None = None) -> Image:
    return Image(id=image_id, type=ImageType.SNAPSHOT, owner="me", created_at=utcnow(),
                 status=status, name=image_id, job=job)


def _save(data: DataDir, image_id: str, size: int = 8192) -> Path:
    data.ensure_ram_dir()
    path = data.ram_file(f"{image_id}.memory.save")
    path.write_bytes(b"guest memory" * (size // 12))
    return path


def test_orphans_are_the_saves_no_live_or_adoptable_job_owns(shm, tmp_path, catalogue):
    data = DataDir(tmp_path / "data")
    catalogue.add(_image("img-avail", ImageStatus.AVAILABLE))
    catalogue.add(_image("img-faild", ImageStatus.FAILED))
    catalogue.add(_image("img-delet", ImageStatus.DELETED))
    catalogue.add(_image("img-stale", ImageStatus.CREATING, DEAD_JOB))  # nothing to adopt
    catalogue.add(_image("img-livej", ImageStatus.CREATING, current_job_token()))
    catalogue.add(_image("img-adopt", ImageStatus.CREATING, DEAD_JOB), snapshot_job=JOB)
    orphaned = {i: _save(data, i) for i in ("img-avail", "img-faild", "img-delet",
                                            "img-stale", "img-norow")}
    kept = {i: _save(data, i) for i in ("img-livej", "img-adopt")}
    nameless = data.ram_file("notes")
    nameless.write_bytes(b"x")
    other = DataDir(tmp_path / "other")  # another data directory, the same ids
    theirs = [_save(other, i) for i in orphaned]

    found = ram_reclaim.survey(data, catalogue)
    assert found.refused == "" and found.directory == data.ram_dir
    assert sorted(o.path for o in found.orphans) == sorted(orphaned.values())
    assert all(o.size >= 8000 for o in found.orphans)  # what it holds in RAM
    assert [(u.path, u.reason) for u in found.undecidable] == [
        (nameless, "its name names no image: nothing says whose it is")]

    removed = ram_reclaim.remove(data, found.orphans)
    assert sorted(o.path for o in removed) == sorted(orphaned.values())
    assert not any(p.exists() for p in orphaned.values())
    assert all(p.exists() for p in [*kept.values(), nameless, *theirs])
    assert ram_reclaim.survey(data, catalogue).orphans == []


def test_an_empty_or_missing_catalogue_proves_nothing(shm, tmp_path, catalogue):
    data = DataDir(tmp_path / "data")
    saved = _save(data, "img-zzzzz")
    for proof in (catalogue, None):
        found = ram_reclaim.survey(data, proof)
        assert found.orphans == [] and [u.path for u in found.undecidable] == [saved]
        assert "proves nothing" in found.undecidable[0].reason
    catalogue.add(_image("img-other", ImageStatus.AVAILABLE))  # a catalogue with rows does
    assert [o.path for o in ram_reclaim.survey(data, catalogue).orphans] == [saved]


def test_a_missing_ram_dir_is_not_made(shm, tmp_path, catalogue):
    data = DataDir(tmp_path / "data")
    found = ram_reclaim.survey(data, catalogue)
    assert (found.orphans, found.undecidable, found.refused) == ([], [], "")
    assert ram_reclaim.remove(data, [Orphan(data.ram_file("img-zzzzz.memory.save"), 1)]) == []
    assert not data.ram_dir.exists() and list(shm.iterdir()) == []


def test_a_symlinked_ram_dir_is_never_followed(shm, tmp_path, catalogue):
    data = DataDir(tmp_path / "data")
    catalogue.add(_image("img-other", ImageStatus.AVAILABLE))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    planted = elsewhere / data.ram_file("img-zzzzz.memory.save").name  # an orphan's name
    planted.write_bytes(b"not bbsnap's")
    data.ram_dir.symlink_to(elsewhere)

    found = ram_reclaim.survey(data, catalogue)
    assert found.refused == "it is a symlink" and found.orphans == found.undecidable == []
    assert ram_reclaim.remove(data, [Orphan(data.ram_file("img-zzzzz.memory.save"), 1)]) == []
    assert planted.read_bytes() == b"not bbsnap's"


def test_a_ram_dir_others_can_enter_is_not_read(shm, tmp_path, catalogue):
    data = DataDir(tmp_path / "data")
    catalogue.add(_image("img-other", ImageStatus.AVAILABLE))
    saved = _save(data, "img-zzzzz")
    os.chmod(data.ram_dir, 0o755)
    found = ram_reclaim.survey(data, catalogue)
    assert found.refused == "others can enter it (mode 0755)" and found.orphans == []
    assert ram_reclaim.remove(data, [Orphan(saved, 1)]) == [] and saved.exists()


def test_only_this_data_directorys_files_in_ram_dir_are_deleted(shm, tmp_path):
    """remove() is handed paths: one of another data directory, or outside ram_dir, is left."""
    data, other = DataDir(tmp_path / "data"), DataDir(tmp_path / "other")
    theirs = _save(other, "img-zzzzz")
    outside = tmp_path / data.ram_file("img-zzzzz.memory.save").name
    outside.write_bytes(b"x")
    assert ram_reclaim.remove(data, [Orphan(theirs, 1), Orphan(outside, 1)]) == []
    assert theirs.exists() and outside.exists()


def test_someone_elses_ram_dir_is_refused_by_its_owner():
    """private_dirs.refusal, which decides for ram_dir, on lstat's answer (making another
    user's directory needs root)."""
    import stat

    from bbsnap import private_dirs

    def info(mode: int, uid: int) -> os.stat_result:
        return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))

    assert private_dirs.refusal(info(stat.S_IFDIR | 0o700, os.getuid() + 1)) == \
        f"it belongs to uid {os.getuid() + 1}, not to you"
    assert private_dirs.refusal(info(stat.S_IFREG | 0o600, os.getuid())) == \
        "it is not a directory"
    assert private_dirs.refusal(info(stat.S_IFDIR | 0o700, os.getuid())) == ""


def test_full_copies_in_qemus_ram_dir_are_judged_the_same_way(shm, tmp_path, catalogue):
    data = DataDir(tmp_path / "data", qemu_user="no-such-user-here")  # QEMU runs as us
    catalogue.add(_image("img-avail", ImageStatus.AVAILABLE))
    catalogue.add(_image("img-adopt", ImageStatus.CREATING, DEAD_JOB), snapshot_job=JOB)
    assert data.ensure_qemu_ram_dir() is not None
    orphan = data.qemu_ram_file("img-avail.vda.copy.qcow2")
    adopted = data.qemu_ram_file("img-adopt.vda.copy.qcow2")
    for path in (orphan, adopted):
        path.write_bytes(b"guest disk" * 1000)
    save = _save(data, "img-avail")

    copies = ram_reclaim.survey(data, catalogue, qemu=True)
    assert copies.directory == data.qemu_ram_dir and copies.refused == ""
    assert [o.path for o in copies.orphans] == [orphan]
    memory = ram_reclaim.survey(data, catalogue)
    assert [o.path for o in memory.orphans] == [save]
    removed = ram_reclaim.remove(data, copies.orphans + memory.orphans)
    assert sorted(o.path for o in removed) == sorted([orphan, save])
    assert adopted.exists() and not orphan.exists() and not save.exists()
