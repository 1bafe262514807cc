"""The memory capture's steps (services/snapshots/memory.py) on the fake hypervisor, with
real qcow2 files: the guest runs again after every outcome, a disk instant is kept only
when the whole capture succeeded, and a guest a user paused stays paused."""

from __future__ import annotations

from pathlib import Path

import pytest

from bbsnap.disks import qemu_img
from bbsnap.errors import BbsnapError, HypervisorError
from bbsnap.hypervisor import DomainState, PauseCause
from bbsnap.models import SnapshotDisk, SnapshotJob
from bbsnap.services.snapshots import memory
from bbsnap.state.layout import DataDir
from tests.fakes.hypervisor import running_domain

IMAGE = "img-aaaaa"


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
    memory.capture(hv, data, IMAGE, job, [])
    calls = hv.calls[hv.calls.index("save_memory_live"):]
    assert calls == ["save_memory_live", "pause_cause", "resume"], "nothing more in the pause"
    assert hv.info(job.domain).state is DomainState.RUNNING
    assert qemu_img.snapshot_names(disk) == [memory.internal_name(IMAGE)]
    assert memory.work_file(data, IMAGE).is_file()
    saved = hv.saved_domain(memory.work_file(data, IMAGE))
    assert saved.disks == {"vda": str(disk)}
    memory.forget_disk_states(hv, job, IMAGE)
    assert qemu_img.snapshot_names(disk) == []


def test_a_failed_disk_instant_resumes_the_guest_and_keeps_nothing(setup, work_dir):
    hv, data, job, disk = setup
    broken = SnapshotJob(job.domain, job.domain_uuid, "memory", (
        job.disks[0], SnapshotDisk("vdb", str(work_dir / "missing.qcow2"), "qcow2",
                                   str(work_dir / "t.qcow2"))))
    with pytest.raises(BbsnapError):
        memory.capture(hv, data, IMAGE, broken, [])
    assert hv.info(job.domain).state is DomainState.RUNNING
    assert qemu_img.snapshot_names(disk) == [], "the first disk's instant is deleted too"


def test_a_refused_save_leaves_the_guest_running(setup):
    hv, data, job, _ = setup
    refused = SnapshotJob(job.domain, job.domain_uuid, "memory", job.disks)
    with pytest.raises(HypervisorError, match="no disk named 'hdz'"):
        memory.capture(hv, data, IMAGE, refused, ["hdz"])
    assert hv.info(job.domain).state is DomainState.RUNNING
    assert not memory.work_file(data, IMAGE).exists()


def test_a_guest_a_user_paused_stays_paused(setup):
    hv, _, job, _ = setup
    hv.suspend(job.domain)
    memory.resume_unless_user_paused(hv, job.domain)
    memory.resume_after_save(hv, job.domain)
    assert hv.pause_cause(job.domain) is PauseCause.USER
