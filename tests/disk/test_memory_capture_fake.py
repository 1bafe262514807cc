"""The memory capture's steps (services/snapshots/memory.py) on the fake hypervisor, with
real qcow2 files: the guest runs again after every outcome, a disk instant is kept only
when the whole capture succeeded, and a guest a user paused stays paused."""

from __future__ import annotations

import fcntl
import os
import struct
import time
from pathlib import Path

import pytest

from bbsnap.disks import image_lock, qemu_img
from bbsnap.errors import BbsnapError, HypervisorError
from bbsnap.hypervisor import DomainState, PauseCause
from bbsnap.models import SnapshotDisk, SnapshotJob
from bbsnap.services.snapshots import memory
from bbsnap.services.snapshots.timeline import COMMAND as timeline
from bbsnap.state.layout import DataDir
from tests.fakes.hypervisor import running_domain

IMAGE = "img-aaaaa"
RAM = 64 << 20  # the fake guest's (running_domain)


@pytest.fixture()
def setup(work_dir: Path):
    data = DataDir(work_dir / "data").ensure()
    hv, spec = running_domain(work_dir)
    disk = spec.disks[0].path
    job = SnapshotJob(domain=spec.name, domain_uuid=spec.uuid, mode="memory", disks=(
        SnapshotDisk("vda", str(disk), "qcow2", str(data.tmp_dir / f"{IMAGE}.qcow2")),))
    return hv, data, job, disk


def test_a_capture_keeps_the_disks_instant_and_the_guest_runs_on(setup):
    hv, data, job, disk = setup
    memory.capture(hv, data, IMAGE, job, [], RAM)
    calls = hv.calls[hv.calls.index("save_memory_live"):]
    assert calls == ["save_memory_live", "pause_cause", "resume"], "nothing more in the pause"
    assert "hardware" not in hv.calls, "the guest's RAM comes from check(), not a second read"
    assert hv.info(job.domain).state is DomainState.RUNNING
    assert qemu_img.snapshot_names(disk) == [memory.internal_name(IMAGE)]
    assert memory.raw_file(data, IMAGE) is not None
    saved = hv.saved_domain(memory.raw_file(data, IMAGE))
    assert saved.disks == {"vda": str(disk)}
    memory.forget_disk_states(hv, job, IMAGE)
    assert qemu_img.snapshot_names(disk) == []


def test_a_failed_disk_instant_resumes_the_guest_and_keeps_nothing(setup, work_dir):
    hv, data, job, disk = setup
    broken = SnapshotJob(job.domain, job.domain_uuid, "memory", (
        job.disks[0], SnapshotDisk("vdb", str(work_dir / "missing.qcow2"), "qcow2",
                                   str(work_dir / "t.qcow2"))))
    with pytest.raises(BbsnapError):
        memory.capture(hv, data, IMAGE, broken, [], RAM)
    assert hv.info(job.domain).state is DomainState.RUNNING
    assert qemu_img.snapshot_names(disk) == [], "the first disk's instant is deleted too"


def test_a_refused_save_leaves_the_guest_running(setup):
    hv, data, job, _ = setup
    refused = SnapshotJob(job.domain, job.domain_uuid, "memory", job.disks)
    with pytest.raises(HypervisorError, match="no disk named 'hdz'"):
        memory.capture(hv, data, IMAGE, refused, ["hdz"], RAM)
    assert hv.info(job.domain).state is DomainState.RUNNING
    assert memory.raw_file(data, IMAGE) is None


def test_a_guest_a_user_paused_stays_paused(setup):
    hv, _, job, _ = setup
    hv.suspend(job.domain)
    memory.resume_unless_user_paused(hv, job.domain)
    memory.resume_after_save(hv, job.domain)
    assert hv.pause_cause(job.domain) is PauseCause.USER


class _QemuLock:
    """An image lock as a running QEMU holds one (disks/image_lock.py): a shared OFD lock on
    byte 201 (write not shared), which makes qemu-img refuse to write the image."""

    def __init__(self, disk: Path) -> None:
        self._fd: int | None = os.open(disk, os.O_RDONLY)
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK,
                    struct.pack("hhqqi", fcntl.F_RDLCK, os.SEEK_SET, 201, 1, 0))

    def release(self) -> None:  # what QEMU's inactivation at the end of its final pass does
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@pytest.fixture()
def marks():
    timeline.clear()
    yield lambda: [label for label, _ in timeline.marks]
    timeline.clear()


def test_the_disk_states_are_made_while_the_save_ends(setup, marks, monkeypatch):
    """Once QEMU lets go of the disks the internal snapshots are made at once, while
    libvirt is still ending the save (the guest stopped all along)."""
    hv, data, job, disk = setup
    lock = _QemuLock(disk)
    assert image_lock.held_for_writing(disk)
    with pytest.raises(BbsnapError, match="another process using the image"):
        qemu_img.snapshot_create(disk, "refused-while-qemu-holds-it")
    save = hv.save_memory_live
    seen_during_the_save: list[list[str]] = []

    def slow_save(*args, **kwargs):
        save(*args, **kwargs)  # the fake's save: the domain is left paused
        lock.release()
        deadline = time.monotonic() + 30
        while not qemu_img.snapshot_names(disk) and time.monotonic() < deadline:
            time.sleep(0.01)  # libvirt still ending the save
        seen_during_the_save.append(qemu_img.snapshot_names(disk))

    monkeypatch.setattr(hv, "save_memory_live", slow_save)
    memory.capture(hv, data, IMAGE, job, [], RAM)
    assert seen_during_the_save == [[memory.internal_name(IMAGE)]]
    assert qemu_img.snapshot_names(disk) == [memory.internal_name(IMAGE)], "made once"
    assert marks() == ["disks-released", "memory-saved", "disk-states", "resumed"]
    assert hv.info(job.domain).state is DomainState.RUNNING


def test_disks_still_locked_when_the_save_returns_are_done_after_it(setup, marks):
    hv, data, job, disk = setup
    lock = _QemuLock(disk)
    save = hv.save_memory_live
    hv.save_memory_live = lambda *a, **k: (save(*a, **k), lock.release())  # type: ignore[method-assign]
    memory.capture(hv, data, IMAGE, job, [], RAM)
    assert marks() == ["memory-saved", "disk-states", "resumed"]
    assert qemu_img.snapshot_names(disk) == [memory.internal_name(IMAGE)]


def test_a_failed_save_after_the_release_keeps_no_disk_state(setup, marks, monkeypatch):
    hv, data, job, disk = setup
    lock = _QemuLock(disk)
    save = hv.save_memory_live

    def failing_save(*args, **kwargs):
        save(*args, **kwargs)
        lock.release()
        deadline = time.monotonic() + 30
        while not qemu_img.snapshot_names(disk) and time.monotonic() < deadline:
            time.sleep(0.01)
        raise HypervisorError("saving the memory failed: libvirtd went away")

    monkeypatch.setattr(hv, "save_memory_live", failing_save)
    with pytest.raises(HypervisorError, match="went away"):
        memory.capture(hv, data, IMAGE, job, [], RAM)
    assert qemu_img.snapshot_names(disk) == []
    assert hv.info(job.domain).state is DomainState.RUNNING
    assert "memory-saved" not in marks()


def test_the_raw_save_goes_to_ram_when_there_is_room(setup, monkeypatch):
    """libvirt's end of a save writes the file out while the guest is stopped: on tmpfs
    that costs nothing (DataDir.ram_dir), so it goes there while the host can spare it."""
    hv, data, job, _ = setup
    memory.capture(hv, data, IMAGE, job, [], RAM)
    raw = memory.raw_file(data, IMAGE)
    assert raw is not None and raw.parent == data.ram_dir
    assert raw.stat().st_mode & 0o777 == 0o600 and data.ram_dir.stat().st_mode & 0o777 == 0o700
    assert data.ram_files() == [raw]
    name, size = memory.store(data, IMAGE)
    assert (data.images_dir / name).stat().st_size == size
    assert data.ram_files() == [] and memory.raw_file(data, IMAGE) is None


def test_without_room_in_ram_the_raw_save_goes_to_tmp(setup, monkeypatch):
    hv, data, job, disk = setup
    monkeypatch.setattr(memory.hostinfo, "available_memory_bytes", lambda: RAM)  # < 2x RAM
    memory.capture(hv, data, IMAGE, job, [], RAM)
    assert memory.raw_file(data, IMAGE) == memory.work_file(data, IMAGE)
    assert data.ram_files() == []
    memory.forget_disk_states(hv, job, IMAGE)


def test_a_failed_images_raw_save_in_ram_is_removed(setup):
    hv, data, job, _ = setup
    memory.capture(hv, data, IMAGE, job, [], RAM)
    assert data.ram_files()
    data.remove_image_files(IMAGE)
    assert data.ram_files() == [] and memory.raw_file(data, IMAGE) is None
