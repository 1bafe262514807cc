"""Server create, rebuild and snapshot begin on real qcow2 files, against the fake
hypervisor: what the services hand the port (the domain spec, a disk replacement with its
metadata, a backup plan), and that a failure at the hypervisor undoes every step or, for a
broken bitmap, falls back to a full copy; and a failing copy's finish, with the guest QEMU
stopped on an I/O error or a user paused. No libvirtd; the real paths are in
tests/system/test_servers.py, test_revert.py and test_snapshot_faults.py, and
tests/contract checks the fake.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bbsnap.state.catalogue import Catalogue
from bbsnap.disks import qemu_img
from bbsnap.errors import HypervisorError
from bbsnap.hypervisor import DomainInfo, DomainState, NewCheckpoint, PauseCause
from bbsnap.state.layout import DataDir
from bbsnap.models import Consistency, Image, ImageStatus, ServerStatus
from bbsnap.services.snapshots import change_tracking
from bbsnap.services.snapshots.finish import SnapshotFailed, SnapshotFinisher
from bbsnap.services.servers import ServerService
from bbsnap.services.snapshots.start import SnapshotRequest
from tests.disk.fake_servers import (Notes, base_catalogue, create_request, server_creator,
                                     snapshot_service)
from tests.fakes.hypervisor import FakeHypervisor


class RefusingStart(FakeHypervisor):
    """The fake, except that starts fail once *allowed* starts have succeeded."""

    def __init__(self, allowed: int = 0) -> None:
        super().__init__()
        self.allowed = allowed

    def start(self, name: str) -> DomainInfo:
        if self.allowed <= 0:
            self.calls.append("start")
            raise HypervisorError(f"starting {name} failed: internal error: QEMU exited")
        self.allowed -= 1
        return super().start(name)


@pytest.fixture()
def data(work_dir: Path) -> DataDir:
    return DataDir(work_dir / "data").ensure()


@pytest.fixture()
def catalogue(data: DataDir):
    cat = base_catalogue(data)
    yield cat
    cat.close()


def test_create_defines_the_domain_it_describes_and_starts_it(data, catalogue, work_dir):
    hv = FakeHypervisor()
    creator, registry = server_creator(data, catalogue, hv, work_dir)
    server = creator.create(create_request(work_dir, hostname="web-1"))
    assert (server.status, server.name, server.image_id) == (ServerStatus.ACTIVE, "web",
                                                             "img-base0")
    facts = hv.facts(server.id, inactive=True)
    directory = data.server_dir(server.id)
    assert facts.disks == (str(directory / "disk.qcow2"),)
    assert [(d.target, d.device, d.format) for d in facts.file_disks] == [
        ("vda", "disk", "qcow2"), ("hdc", "cdrom", "raw")]
    assert facts.console_log == directory / "console.log"
    assert facts.metadata["image_id"] == "img-base0" and facts.metadata["hostname"] == "web-1"
    assert facts.forwarded_ports == (server.ssh_port,) and server.ssh_port in registry.claims()
    assert qemu_img.info(directory / "disk.qcow2", "qcow2").backing_file == str(
        data.images_dir / "img-base0.qcow2")
    assert [d.dependent_id for d in catalogue.dependents("img-base0")] == [server.id]


def test_a_create_whose_start_fails_leaves_nothing(data, catalogue, work_dir):
    hv = RefusingStart()
    creator, registry = server_creator(data, catalogue, hv, work_dir)
    with pytest.raises(HypervisorError, match="starting"):
        creator.create(create_request(work_dir))
    assert "define" in hv.calls and "undefine" in hv.calls
    assert hv.list_domains() == []
    assert [p.name for p in data.servers_dir.iterdir() if p.name.startswith("srv-")] == []
    assert catalogue.dependents("img-base0") == [] and registry.claims() == {}


def test_rebuild_replaces_the_disk_and_the_image_in_one_definition(data, catalogue, work_dir):
    hv = FakeHypervisor()
    creator, _ = server_creator(data, catalogue, hv, work_dir)
    server = creator.create(create_request(work_dir))
    old_disk = hv.facts(server.id).disks[0]
    rebuilt = ServerService(hv, catalogue, data).rebuild(server.id, "img-next0")
    (new_disk,) = hv.facts(server.id, inactive=True).disks
    assert new_disk != old_disk and not Path(old_disk).exists()
    assert qemu_img.info(Path(new_disk), "qcow2").backing_file == str(
        data.images_dir / "img-next0.qcow2")
    assert rebuilt.image_id == "img-next0" and rebuilt.status is ServerStatus.ACTIVE
    assert hv.facts(server.id).disks == (new_disk,), "restarted on the new disk"
    assert hv.facts(server.id).metadata["name"] == "web", "the rest of the metadata kept"
    assert catalogue.dependents("img-base0") == []
    assert [d.dependent_id for d in catalogue.dependents("img-next0")] == [server.id]


def test_a_rebuild_whose_restart_fails_puts_the_old_definition_back(data, catalogue, work_dir):
    hv = RefusingStart(allowed=1)  # the create's start; the rebuild's restarts fail
    creator, _ = server_creator(data, catalogue, hv, work_dir)
    server = creator.create(create_request(work_dir))
    before = hv.facts(server.id, inactive=True)
    with pytest.raises(HypervisorError, match="starting"):
        ServerService(hv, catalogue, data).rebuild(server.id, "img-next0")
    assert "replace_disks" in hv.calls
    assert hv.facts(server.id, inactive=True) == before
    assert Path(before.disks[0]).exists()
    assert [p.name for p in data.server_dir(server.id).glob("disk-img-*")] == []
    assert (data.server_dir(server.id) / "disk-tracked").read_text() == "disk.qcow2\n"
    assert catalogue.dependents("img-next0") == []
    assert [d.dependent_id for d in catalogue.dependents("img-base0")] == [server.id]
    assert hv.info(server.id).state is DomainState.SHUTOFF  # its restart is what failed


# -- snapshot begin: the backup plan handed to the port ---------------------------------------

def test_a_snapshot_of_a_new_server_copies_what_it_wrote_since_its_birth(data, catalogue,
                                                                          work_dir):
    hv = FakeHypervisor()
    creator, _ = server_creator(data, catalogue, hv, work_dir)
    server = creator.create(create_request(work_dir))
    notes = Notes()
    image = snapshot_service(data, catalogue, hv, notes).begin(SnapshotRequest(server.id))
    plan = hv.backup_plan(server.id)
    assert plan is not None and notes.lines == []
    assert [t.device for t in plan.targets] == ["vda"] and plan.skipped == ("hdc",)
    assert plan.targets[0].path.parent == data.tmp_dir
    assert plan.incremental_from == change_tracking.CHECKPOINT, "the birth bitmap"
    assert plan.new_checkpoint == NewCheckpoint(f"bbsnap-{image.id}", "vda",
                                                "bbsnap snapshot chain (bbsnap deletes it)")
    assert image.consistency is Consistency.QUIESCED and not hv.is_frozen(server.id)
    assert image.status is ImageStatus.CREATING and image.ancestor_id == "img-base0"


def test_a_broken_birth_bitmap_falls_back_to_a_full_copy_and_says_so(data, catalogue,
                                                                    work_dir):
    hv = FakeHypervisor()
    creator, _ = server_creator(data, catalogue, hv, work_dir)
    server = creator.create(create_request(work_dir))
    hv.redefine_checkpoint(server.id, change_tracking.CHECKPOINT, "vda")
    hv.break_checkpoint(server.id, change_tracking.CHECKPOINT)
    hv.silence_agent(server.id)
    notes = Notes()
    image = snapshot_service(data, catalogue, hv, notes).begin(SnapshotRequest(server.id))
    plan = hv.backup_plan(server.id)
    assert plan is not None and plan.incremental_from is None, "the whole disk"
    assert hv.calls.count("begin_backup") == 2
    assert not hv.has_checkpoint(server.id, change_tracking.CHECKPOINT), "given up"
    assert not (data.server_dir(server.id) / change_tracking.MARKER).exists()
    assert image.consistency is Consistency.CRASH_CONSISTENT
    assert any(n.startswith("warning:") and "crash-consistent" in n for n in notes.lines)
    assert any(n.startswith("note:") and "copying the whole disk" in n for n in notes.lines)


def test_a_stopped_server_is_copied_without_a_backup_job(data, catalogue, work_dir):
    hv = FakeHypervisor()
    creator, _ = server_creator(data, catalogue, hv, work_dir)
    server = creator.create(create_request(work_dir, start=False))
    image = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(server.id))
    assert "begin_backup" not in hv.calls and "freeze" not in hv.calls
    assert image.status is ImageStatus.CREATING


def _failed_copy(data: DataDir, catalogue: Catalogue, work_dir: Path,
                 pause: str) -> tuple[FakeHypervisor, str, Image]:
    """A running server's snapshot whose copy fails on a full target after the guest was
    paused (*pause*: "io-error", QEMU on the write the copy could not save first; "user",
    someone else), run to its end by the worker's finisher: the domain and the image."""
    hv = FakeHypervisor()
    creator, _ = server_creator(data, catalogue, hv, work_dir)
    server = creator.create(create_request(work_dir))
    image = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(server.id))
    if pause == "io-error":
        hv.pause_on_io_error(server.id)
    else:
        hv.suspend(server.id)
    hv.fail_job(server.id, "No space left on device")
    with pytest.raises(SnapshotFailed, match="the copy failed: No space left on device"):
        SnapshotFinisher(catalogue, data, lambda: hv).run(image.id)
    failed = catalogue.get(image.id, include_deleted=True)
    assert failed.status is ImageStatus.FAILED and failed.path is None
    assert failed.failure_reason == "the copy failed: No space left on device"
    assert [p for d in (data.tmp_dir, data.images_dir) for p in d.glob(f"{image.id}*")] == []
    return hv, server.id, failed


def test_a_failing_copy_runs_the_guest_qemu_stopped_on_an_io_error_again(data, catalogue,
                                                                        work_dir):
    hv, domain, _ = _failed_copy(data, catalogue, work_dir, "io-error")
    assert hv.info(domain).state is DomainState.RUNNING
    assert hv.pause_cause(domain) is PauseCause.NOT_PAUSED
    # Only once the job was over (its outcome read): a retried write then goes to the
    # guest's own disk, not to the full target again.
    assert hv.calls.index("resume") > hv.calls.index("completed_job")


def test_a_failing_copy_leaves_a_guest_a_user_paused_paused(data, catalogue, work_dir):
    hv, domain, _ = _failed_copy(data, catalogue, work_dir, "user")
    assert hv.info(domain).state is DomainState.PAUSED
    assert hv.pause_cause(domain) is PauseCause.USER
    assert "pause_cause" in hv.calls and "resume" not in hv.calls
