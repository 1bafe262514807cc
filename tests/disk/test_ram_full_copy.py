"""A standalone full copy written into RAM (services/snapshots/targets.py's RamBudget), then
onto the disk (disks/direct_copy.py), through the service on the fake hypervisor, whose job
writes into the target files bbsnap made, as QEMU's does. The RAM directory is the test's
stand-in for /dev/shm (the shm fixture)."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from bbsnap.disks import direct_copy, qemu_img
from bbsnap.errors import BbsnapError, HypervisorError
from bbsnap.hypervisor import DiskSpec, DomainSpec
from bbsnap.models import ImageStatus
from bbsnap.services.snapshots.finish import SnapshotFinisher
from bbsnap.services.snapshots.start import SnapshotRequest
from bbsnap.state.catalogue import Catalogue
from bbsnap.state.layout import DataDir
from tests.disk.fake_servers import base_catalogue, snapshot_service
from tests.fakes.hypervisor import FakeHypervisor


@pytest.fixture()
def site(work_dir: Path, shm: Path) -> Iterator[tuple[DataDir, Catalogue, FakeHypervisor, str, Path]]:
    """A data directory, its catalogue, and a running domain bbsnap did not make on a
    standalone qcow2 holding 8 MiB (its snapshots are full copies)."""
    data = DataDir(work_dir / "data").ensure()
    catalogue = base_catalogue(data)
    source = work_dir / "disk.qcow2"
    qemu_img.create_blank(source, 256 << 20)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 4M 8M", str(source)],
                   check=True, capture_output=True)
    hv = FakeHypervisor()
    spec = DomainSpec(name="foreign", uuid=str(uuid.uuid4()), memory_mib=64, vcpus=1,
                      accel="tcg", console_log=work_dir / "console.log",
                      disks=(DiskSpec(source, target="vda"),))
    hv.define(spec)
    hv.start(spec.name)
    yield data, catalogue, hv, spec.name, source
    catalogue.close()


def _target(hv: FakeHypervisor, domain: str) -> Path:
    plan = hv.backup_plan(domain)
    assert plan is not None
    (target,) = plan.targets
    return target.path


def test_the_copy_goes_through_ram_and_is_the_disk(site) -> None:
    data, catalogue, hv, domain, source = site
    image = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(domain))
    target = _target(hv, domain)
    assert target.parent == data.qemu_ram_dir and data.is_qemu_ram_file(target)
    assert list(data.tmp_dir.iterdir()) == []
    assert target.stat().st_blocks * 512 < 1 << 20, "in RAM: neither mapped nor reserved"

    hv.complete_job(domain)
    done = SnapshotFinisher(catalogue, data, lambda: hv).run(image.id)

    assert done.status is ImageStatus.AVAILABLE and done.path
    published = data.images_dir / done.path
    compared = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                               str(published), str(source)], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert qemu_img.check(published).clean
    assert published.stat().st_mode & 0o777 == 0o600
    assert done.disk_size == published.stat().st_blocks * 512
    assert data.ram_files() == [], "the copy in RAM is removed once on disk"
    assert sorted(p.name for p in data.images_dir.iterdir() if p.name.startswith(image.id)) \
        == [done.path]


def test_a_copy_the_disk_cannot_take_fails_the_image_and_leaves_nothing(
        site, monkeypatch: pytest.MonkeyPatch) -> None:
    data, catalogue, hv, domain, _ = site
    image = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(domain))
    hv.complete_job(domain)

    def disk_full(fd, buffers, offset):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(direct_copy.os, "pwritev", disk_full)
    with pytest.raises(BbsnapError, match="could not be written"):
        SnapshotFinisher(catalogue, data, lambda: hv).run(image.id)
    failed = catalogue.get(image.id, include_deleted=True)
    assert failed.status is ImageStatus.FAILED
    assert "No space left" in (failed.failure_reason or "")
    assert data.ram_files() == [] and list(data.tmp_dir.iterdir()) == []
    assert not any(p.name.startswith(image.id) for p in data.images_dir.iterdir())


def test_a_target_in_ram_qemu_may_not_open_is_made_in_tmp_instead(site, monkeypatch) -> None:
    """A security profile keeping QEMU out of /dev/shm: libvirt refuses the backup naming the
    file; the same copy goes to tmp/, recorded in the job, and ends available."""
    data, catalogue, hv, domain, source = site
    begin = hv.begin_backup

    def refusing(name, plan):  # type: ignore[no-untyped-def]
        for target in plan.targets:
            if data.is_qemu_ram_file(target.path):
                raise HypervisorError(f"starting the backup of {name} failed: internal error: "
                                      f"Could not open '{target.path}': Permission denied")
        return begin(name, plan)

    monkeypatch.setattr(hv, "begin_backup", refusing)
    image = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(domain))
    target = _target(hv, domain)
    assert target.parent == data.tmp_dir
    assert data.ram_files() == []
    job = catalogue.snapshot_job(image.id)
    assert job is not None and [d.target for d in job.disks] == [str(target)]
    hv.complete_job(domain)
    done = SnapshotFinisher(catalogue, data, lambda: hv).run(image.id)
    assert done.status is ImageStatus.AVAILABLE
    compared = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                               str(data.images_dir / str(done.path)), str(source)],
                              capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert list(data.tmp_dir.iterdir()) == []


def test_any_other_refusal_of_the_backup_fails_as_before(site, monkeypatch) -> None:
    data, catalogue, hv, domain, _ = site

    def busy(name, plan):  # type: ignore[no-untyped-def]
        raise HypervisorError(f"starting the backup of {name} failed: Timed out during "
                              "operation: cannot acquire state change lock")

    monkeypatch.setattr(hv, "begin_backup", busy)
    with pytest.raises(HypervisorError, match="state change lock"):
        snapshot_service(data, catalogue, hv).begin(SnapshotRequest(domain))
    assert data.ram_files() == [] and list(data.tmp_dir.iterdir()) == []
