"""One contract for the hypervisor port, run against the fake and the real libvirt adapter.

Each test runs twice: on tests/fakes/hypervisor.py (milliseconds, no daemon) and on
LibvirtHypervisor over the real libvirtd (qemu:///system, marked ``system``: run it under
the shared libvirtd lock). What the fake claims is what libvirt does, so the service
tests that use the fake test what the real code path meets.

The real side's domains are named ``bbsnap-test-contract-*`` and removed whatever happens.
Its cost is kept to two guests at a time: blank-disk domains (QEMU runs, no OS boots) for
the lifecycle and the memory saves and restores, one booted tiny guest, shared by the
module, for the guest agent and the backup jobs, and one booted on a full disk (its first
write stops it on an I/O error).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import pytest

from bbsnap.disks import qemu_img
from bbsnap.errors import (GuestAgentError, GuestAgentSilentError, HypervisorError, NotFoundError,
                           QuiesceError)
from bbsnap.hypervisor import (BackupPlan, BackupTarget, DiskInfo, DiskReplacement, DiskSpec,
                               DomainFacts, DomainSpec, DomainState, GuestUser, Hypervisor,
                               NewCheckpoint, NicSpec, PauseCause)
from bbsnap.services.memory_restore import mismatches
from bbsnap.tinyguest import READY_LINE
from bbsnap.tinyguest.logins import SESSIONS
from tests.fakes.hypervisor import FakeHypervisor
from tests.system.conftest import agent_answers

MIB = 1 << 20
PREFIX = "bbsnap-test-contract-"
HELD_DISK = 512 * MIB  # written in full: a backup of it runs long enough to be held
# Who the tiny guest's agent reports logged in: each user of its utmp sessions, once.
TINY_GUEST_USERS = [GuestUser(s.user, s.login_time) for s in SESSIONS]


class Side:
    """One implementation of the port, with what its tests need around it: disk files, a
    booted guest, and the ways a backup job is held, let go and waited for."""

    def __init__(self, kind: str, hv: Hypervisor, root: Path, base: Path) -> None:
        self.kind, self.hv, self.root, self.base = kind, hv, root, base
        self.names: list[str] = []
        self._guest: DomainSpec | None = None

    def new_name(self) -> str:
        name = PREFIX + uuid.uuid4().hex[:8]
        self.names.append(name)
        return name

    def blank_disk(self, size: int = 16 * MIB) -> Path:
        path = self.root / f"{uuid.uuid4().hex[:8]}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                       check=True)
        return path

    def overlay(self) -> Path:
        path = self.root / f"{uuid.uuid4().hex[:8]}.qcow2"
        qemu_img.create_overlay(path, self.base)
        return path

    def spec(self, **changes: object) -> DomainSpec:
        """A small domain on a blank disk (QEMU runs, no OS boots), without an agent."""
        name = self.new_name()
        base: dict[str, object] = {
            "name": name, "uuid": str(uuid.uuid4()), "memory_mib": 64, "vcpus": 1,
            "accel": "tcg", "disks": (DiskSpec(self.blank_disk()),),
            "console_log": self.root / f"{name}.log", "guest_agent": False}
        base.update(changes)
        return DomainSpec(**base)  # type: ignore[arg-type]

    def guest(self) -> DomainSpec:
        """The module's booted tiny guest (its agent answers), with a data disk vdb whose
        every byte is written, started on first use."""
        if self._guest is None:
            data = self.blank_disk(HELD_DISK)
            if self.kind == "real":  # QEMU's copy of it then takes long enough to hold
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {HELD_DISK}",
                                str(data)], check=True, capture_output=True)
            spec = self.spec(disks=(DiskSpec(self.overlay()), DiskSpec(data, target="vdb")),
                             memory_mib=128, guest_agent=True)
            self.hv.define(spec)
            self.hv.start(spec.name)
            if isinstance(self.hv, FakeHypervisor):  # the tiny guest's utmp, as its agent says
                self.hv.set_guest_users(spec.name, TINY_GUEST_USERS)
            if self.kind == "real":
                _wait(lambda: READY_LINE in _text(spec.console_log), 240, "the guest to boot")
                # qemu-ga is started before the ready line, and libvirt sees its channel
                # connect a little later: asked of the agent itself, not through the port.
                _wait(lambda: agent_answers(spec.name), 60, "the guest agent to answer")
            self._guest = spec
        return self._guest

    def hold_job(self, name: str) -> None:
        """Keep the domain's running backup job from finishing until release_job."""
        if self.kind == "real":
            from tests.system.conftest import set_backup_speed

            set_backup_speed(name, 1)
        # the fake's job only ends when the test ends it

    def finish_job(self, name: str) -> None:
        """Let the backup job run to its end, and wait for it."""
        if isinstance(self.hv, FakeHypervisor):
            self.hv.complete_job(name)
            return
        from tests.system.conftest import set_backup_speed

        set_backup_speed(name, 0)
        _wait(lambda: not self.hv.job_status(name).active, 120, f"the backup of {name}")

    def user_pause(self, name: str) -> None:
        """Pause the running domain as a user would (virsh suspend): not through the port,
        which never pauses a guest itself."""
        if isinstance(self.hv, FakeHypervisor):
            self.hv.suspend(name)
            return
        import libvirt

        conn = libvirt.open("qemu:///system")
        try:
            conn.lookupByName(name).suspend()
        finally:
            conn.close()

    @contextlib.contextmanager
    def stopped_on_a_write(self) -> Iterator[tuple[DomainSpec, Callable[[], None]]]:
        """A running domain QEMU paused on a write its disk refused, and what gives the disk
        room again. Real: the tiny guest on an overlay on a tmpfs filled up before it starts
        (mounted first: QEMU's mount namespace is made when it starts), stopped by its first
        write (the disks' default werror=enospc); the fake is told."""
        if isinstance(self.hv, FakeHypervisor):
            spec = self.spec()
            self.hv.define(spec)
            self.hv.start(spec.name)
            self.hv.pause_on_io_error(spec.name)
            yield spec, lambda: None
            return
        mount = self.root / f"full-{uuid.uuid4().hex[:6]}"
        mount.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mount)],
                       check=True)
        name = None
        try:
            disk = mount / "vda.qcow2"
            qemu_img.create_overlay(disk, self.base)
            filler = mount / "filler"
            _fill(filler)
            spec = self.spec(disks=(DiskSpec(disk),), memory_mib=128)
            name = spec.name
            self.hv.define(spec)
            self.hv.start(spec.name)
            _wait(lambda: self.hv.pause_cause(spec.name) is not PauseCause.NOT_PAUSED, 240,
                  "the guest's first write to stop it")
            yield spec, lambda: filler.unlink()
        finally:
            if name is not None:
                self.remove(name)  # QEMU lets go of the disk before the unmount
            subprocess.run(["umount", "-l", str(mount)], check=True)
            mount.rmdir()

    def wait_job_gone(self, name: str) -> None:
        _wait(lambda: not self.hv.job_status(name).active, 60, f"the job of {name} to end")

    def remove(self, name: str) -> None:
        try:
            self.hv.destroy(name)
            self.hv.undefine(name)
        except NotFoundError:
            pass


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def _fill(path: Path) -> None:
    """Write *path* until its filesystem has no room left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"\0" * 4096)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return
    finally:
        os.close(fd)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module", params=["fake", pytest.param("real", marks=pytest.mark.system)])
def world(request: pytest.FixtureRequest, test_root: Path) -> Iterator[Side]:
    root = test_root / f"contract-{request.param}-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    os.chmod(root, 0o755)  # QEMU's user opens the disks
    if request.param == "fake":
        base = root / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(64 * MIB)],
                       check=True)
        side = Side("fake", FakeHypervisor(), root, base)
    else:
        from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor
        from bbsnap.tinyguest import build_tiny_guest

        hv = LibvirtHypervisor("qemu:///system")
        try:
            hv.version()
        except HypervisorError as exc:
            pytest.fail(f"libvirtd does not answer ({exc}); run scripts/setup first")
        base = root / "tiny.qcow2"  # a copy: libvirt relabels backing files, not the cache's
        shutil.copyfile(build_tiny_guest(), base)
        os.chmod(base, 0o644)
        side = Side("real", hv, root, base)
    try:
        yield side
    finally:
        for name in side.names:
            side.remove(name)
        side.hv.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def side(world: Side) -> Iterator[Side]:
    """The module's side; domains a test made (not the shared guest) go when it ends."""
    before = len(world.names)
    yield world
    shared = world._guest.name if world._guest else None
    for name in world.names[before:]:
        if name != shared:
            world.remove(name)


# -- lifecycle ---------------------------------------------------------------------------------

def test_define_info_list_and_undefine(side):
    spec = side.spec()
    info = side.hv.define(spec)
    assert (info.name, info.uuid, info.state, info.persistent) == (
        spec.name, spec.uuid, DomainState.SHUTOFF, True)
    assert side.hv.info(spec.uuid) == info, "a domain is found by its UUID too"
    assert info in side.hv.list_domains()
    side.hv.undefine(spec.name)
    with pytest.raises(NotFoundError):
        side.hv.info(spec.name)
    assert spec.name not in {d.name for d in side.hv.list_domains()}


def test_start_destroy_and_their_refusals(side):
    spec = side.spec()
    side.hv.define(spec)
    assert side.hv.start(spec.name).state is DomainState.RUNNING
    with pytest.raises(HypervisorError) as again:
        side.hv.start(spec.name)
    assert not isinstance(again.value, NotFoundError)
    side.hv.destroy(spec.name)
    assert side.hv.info(spec.name).state is DomainState.SHUTOFF
    side.hv.destroy(spec.name)  # already off: nothing to do, no error
    assert side.hv.addresses(spec.name) == []


def test_a_domain_whose_disk_is_missing_does_not_start(side):
    spec = side.spec(disks=(DiskSpec(side.root / "no-such-disk.qcow2"),))
    side.hv.define(spec)
    with pytest.raises(HypervisorError):
        side.hv.start(spec.name)
    assert side.hv.info(spec.name).state is DomainState.SHUTOFF


def test_undefining_a_running_domain_leaves_it_transient_until_it_stops(side):
    spec = side.spec()
    side.hv.define(spec)
    side.hv.start(spec.name)
    side.hv.undefine(spec.name)
    info = side.hv.info(spec.name)
    assert (info.state, info.persistent) == (DomainState.RUNNING, False)
    side.hv.destroy(spec.name)
    with pytest.raises(NotFoundError):
        side.hv.info(spec.name)


def test_a_domain_is_found_by_its_uuid_too(side):
    spec = side.spec()
    side.hv.define(spec)
    assert side.hv.info(spec.uuid).name == spec.name
    assert side.hv.facts(spec.uuid, inactive=True).disks == (str(spec.disks[0].path),)
    started = side.hv.start(spec.uuid)
    assert (started.name, started.state) == (spec.name, DomainState.RUNNING)
    side.hv.destroy(spec.uuid)
    assert side.hv.info(spec.name).state is DomainState.SHUTOFF


def test_an_unknown_domain_is_not_found_by_every_operation(side):
    name = PREFIX + "missing"
    calls = [lambda: side.hv.info(name), lambda: side.hv.start(name),
             lambda: side.hv.destroy(name), lambda: side.hv.undefine(name),
             lambda: side.hv.facts(name), lambda: side.hv.facts(name, inactive=True),
             lambda: side.hv.disks(name), lambda: side.hv.set_metadata(name, {}),
             lambda: side.hv.replace_disks(name, [DiskReplacement("vda", side.root / "x.qcow2")]),
             lambda: side.hv.checkpoints(name), lambda: side.hv.job_status(name),
             lambda: side.hv.freeze(name, 1), lambda: side.hv.thaw(name),
             lambda: side.hv.shutdown(name), lambda: side.hv.reboot(name),
             lambda: side.hv.hardware(name), lambda: side.hv.memory_save_running(name),
             lambda: side.hv.save_memory_live(name, side.root / "x.save", ["vda"], [], 30),
             lambda: side.hv.pause_cause(name), lambda: side.hv.resume(name),
             lambda: side.hv.delete_disk_snapshot(name, "/x.qcow2", "s")]
    for call in calls:
        with pytest.raises(NotFoundError) as caught:
            call()
        assert caught.value.message == f"server {name} not found"


def test_an_unknown_network_is_not_found(side):
    with pytest.raises(NotFoundError, match="libvirt network 'bbsnap-test-no-such-net'"):
        side.hv.check_network("bbsnap-test-no-such-net")


# -- facts -------------------------------------------------------------------------------------

def test_facts_read_back_what_was_defined(side):
    disk, data, seed = side.blank_disk(), side.blank_disk(), side.root / "seed.iso"
    seed.write_bytes(b"\0" * 2048)
    spec = side.spec(
        title="dev <box>\nsecond line", memory_mib=96, vcpus=2,
        disks=(DiskSpec(disk), DiskSpec(data, target="vdb"),
               DiskSpec(seed, format="raw", device="cdrom", target="hdc", bus="ide")),
        nics=(NicSpec("52:54:00:c0:00:01", ssh_forward_port=40222),
              NicSpec("52:54:00:c0:00:02", network="default")),
        metadata={"name": "dev <box>\nsecond line", "image_id": "img-aaaaa", "empty": ""})
    side.hv.define(spec)
    expected = DomainFacts(
        title="dev <box> second line", metadata=spec.metadata,
        macs=("52:54:00:c0:00:02", "52:54:00:c0:00:01"), disks=(str(disk), str(data)),
        networks=("default",), memory_mib=96, vcpus=2, firmware="bios",
        forwarded_ports=(40222,), console_log=spec.console_log,
        file_disks=(DiskInfo("vda", str(disk), "qcow2", "disk", False),
                    DiskInfo("vdb", str(data), "qcow2", "disk", False),
                    DiskInfo("hdc", str(seed), "raw", "cdrom", True)))
    assert side.hv.facts(spec.name, inactive=True) == expected
    assert side.hv.facts(spec.name) == expected, "a shut-off domain's live facts are its own"
    assert side.hv.disks(spec.name) == list(expected.file_disks)


def test_a_foreign_domain_has_no_metadata_and_uefi_is_recognised(side):
    spec = side.spec(firmware="uefi", memory_mib=256)
    side.hv.define(spec)
    facts = side.hv.facts(spec.name)
    assert (facts.title, facts.metadata, facts.firmware) == (None, {}, "uefi")


def test_a_running_domains_live_disks_show_their_backing_file(side):
    disk = side.overlay()
    spec = side.spec(disks=(DiskSpec(disk),))
    side.hv.define(spec)
    assert side.hv.disks(spec.name)[0].backing is None
    side.hv.start(spec.name)
    (live,) = side.hv.disks(spec.name)
    assert (live.path, live.backing) == (str(disk), str(side.base))
    assert side.hv.facts(spec.name, inactive=True).file_disks[0].backing is None


# -- changing the definition -------------------------------------------------------------------

def test_replace_disk_and_metadata_in_one_new_definition(side):
    spec = side.spec(metadata={"image_id": "img-aaaaa", "name": "n"})
    side.hv.define(spec)
    new = side.blank_disk()
    side.hv.replace_disks(spec.name, [DiskReplacement("vda", new, "qcow2")],
                          metadata={"image_id": "img-bbbbb", "name": "n"})
    facts = side.hv.facts(spec.name, inactive=True)
    assert facts.disks == (str(new),) and facts.file_disks[0].format == "qcow2"
    assert facts.metadata == {"image_id": "img-bbbbb", "name": "n"}
    assert side.hv.info(spec.name).uuid == spec.uuid
    side.hv.replace_disks(spec.name, [DiskReplacement("vda", Path(spec.disks[0].path))])
    again = side.hv.facts(spec.name, inactive=True)  # without metadata: the facts are kept
    assert again.disks == (str(spec.disks[0].path),)
    assert again.metadata == {"image_id": "img-bbbbb", "name": "n"}


def test_several_disks_are_replaced_in_one_definition_and_a_foreign_one_gets_no_metadata(side):
    spec = side.spec(disks=(DiskSpec(side.blank_disk()),
                            DiskSpec(side.blank_disk(), target="vdb"),
                            DiskSpec(side.blank_disk(), target="vdc")))
    side.hv.define(spec)
    new_a, new_c = side.blank_disk(), side.blank_disk()
    side.hv.replace_disks(spec.name, [DiskReplacement("vda", new_a),
                                      DiskReplacement("vdc", new_c)])
    facts = side.hv.facts(spec.name, inactive=True)
    assert facts.disks == (str(new_a), str(spec.disks[1].path), str(new_c))
    assert facts.metadata == {}
    with pytest.raises(NotFoundError, match="has no disk vdz"):
        side.hv.replace_disks(spec.name, [DiskReplacement("vda", side.blank_disk()),
                                          DiskReplacement("vdz", side.blank_disk())])
    assert side.hv.facts(spec.name, inactive=True).disks == facts.disks, "all or nothing"


def test_replacing_a_disk_the_domain_does_not_have_is_not_found(side):
    spec = side.spec()
    side.hv.define(spec)
    with pytest.raises(NotFoundError, match="has no disk vdz"):
        side.hv.replace_disks(spec.name, [DiskReplacement("vdz", side.blank_disk())])
    assert side.hv.facts(spec.name).disks == (str(spec.disks[0].path),)


def test_set_metadata_replaces_bbsnaps_facts_only(side):
    spec = side.spec(title="t", metadata={"image_id": "img-aaaaa", "old": "x"})
    side.hv.define(spec)
    side.hv.set_metadata(spec.name, {"image_id": "img-ccccc"})
    facts = side.hv.facts(spec.name)
    assert facts.metadata == {"image_id": "img-ccccc"}
    assert (facts.title, facts.disks) == ("t", (str(spec.disks[0].path),))


def test_a_running_domain_keeps_its_live_definition_until_it_restarts(side):
    spec = side.spec(metadata={"image_id": "img-aaaaa"})
    side.hv.define(spec)
    side.hv.start(spec.name)
    new = side.blank_disk()
    side.hv.replace_disks(spec.name, [DiskReplacement("vda", new)],
                          metadata={"image_id": "img-bbbbb"})
    assert side.hv.facts(spec.name).disks == (str(spec.disks[0].path),)
    assert side.hv.facts(spec.name, inactive=True).disks == (str(new),)
    side.hv.destroy(spec.name)
    side.hv.start(spec.name)
    live = side.hv.facts(spec.name)
    assert live.disks == (str(new),) and live.metadata == {"image_id": "img-bbbbb"}


def test_redefining_keeps_the_identity(side):
    spec = side.spec(title="before")
    side.hv.define(spec)
    info = side.hv.define(replace(spec, title="after"))
    assert (info.name, info.uuid) == (spec.name, spec.uuid)
    assert side.hv.facts(spec.name).title == "after"
    assert [d.name for d in side.hv.list_domains()].count(spec.name) == 1


# -- checkpoints -------------------------------------------------------------------------------

def test_checkpoints_recorded_listed_and_forgotten(side):
    disk = side.blank_disk()
    qemu_img.add_bitmap(disk, "bbsnap-test-cp")  # a redefined checkpoint's bitmap is there
    spec = side.spec(disks=(DiskSpec(disk),))
    side.hv.define(spec)
    assert side.hv.checkpoints(spec.name) == []
    assert not side.hv.has_checkpoint(spec.name, "bbsnap-test-cp")
    side.hv.redefine_checkpoint(spec.name, "bbsnap-test-cp", "vda")
    assert side.hv.has_checkpoint(spec.name, "bbsnap-test-cp")
    assert side.hv.checkpoints(spec.name) == ["bbsnap-test-cp"]
    side.hv.delete_checkpoint(spec.name, "bbsnap-test-cp")
    side.hv.delete_checkpoint(spec.name, "bbsnap-test-cp")  # gone already: no error
    assert side.hv.checkpoints(spec.name) == []


# -- the guest agent ---------------------------------------------------------------------------

def test_freeze_and_thaw_through_the_agent(side):
    guest = side.guest()
    assert side.hv.freeze(guest.name, 5) >= 0
    side.hv.thaw(guest.name)


def test_the_agent_reports_who_is_logged_in(side):
    guest = side.guest()
    users = side.hv.logged_in_users(guest.name, 2)
    assert sorted(users, key=lambda u: u.name) == sorted(TINY_GUEST_USERS, key=lambda u: u.name)
    assert side.hv.freeze(guest.name, 5) >= 0, "the agent still answers afterwards"
    side.hv.thaw(guest.name)


# Each question to the guest agent, and what it raises when no agent can answer.
AGENT_QUESTIONS = {
    "freeze": (lambda hv, name: hv.freeze(name, 1), QuiesceError),
    "thaw": (lambda hv, name: hv.thaw(name, 1), QuiesceError),
    "logged_in_users": (lambda hv, name: hv.logged_in_users(name, 1), GuestAgentError),
}


@pytest.mark.parametrize("question", AGENT_QUESTIONS)
def test_without_an_agent_or_a_running_guest_the_agent_answers_nothing(side, question):
    ask, error = AGENT_QUESTIONS[question]
    spec = side.spec(guest_agent=False)
    side.hv.define(spec)
    with pytest.raises(error):
        ask(side.hv, spec.name)  # shut off
    side.hv.start(spec.name)
    with pytest.raises(error):
        ask(side.hv, spec.name)  # no agent channel


def test_a_freeze_nothing_answers_is_told_apart_from_one_without_an_agent_channel(side):
    """The worker asks a silent agent nothing more (each question another timeout); an
    absent channel answers at once, so it is a plain QuiesceError."""
    spec = side.spec(guest_agent=True)  # a channel, and no OS to run an agent on it
    side.hv.define(spec)
    side.hv.start(spec.name)
    if isinstance(side.hv, FakeHypervisor):
        side.hv.silence_agent(spec.name)
    with pytest.raises(GuestAgentSilentError):
        side.hv.freeze(spec.name, 1)
    without = side.spec(guest_agent=False)
    side.hv.define(without)
    side.hv.start(without.name)
    with pytest.raises(QuiesceError) as refused:
        side.hv.freeze(without.name, 1)
    assert not isinstance(refused.value, GuestAgentSilentError)


# -- backup jobs -------------------------------------------------------------------------------

def test_no_job_on_a_stopped_or_idle_domain(side):
    spec = side.spec()
    side.hv.define(spec)
    status = side.hv.job_status(spec.name)
    assert (status.active, status.percent) == (False, None)
    assert not side.hv.completed_job(spec.name).known, "a stopped domain remembers no job"
    side.hv.abort_job(spec.name)  # nothing to abort: no error
    side.hv.start(spec.name)
    assert not side.hv.job_status(spec.name).active
    assert not side.hv.completed_job(spec.name).known
    with pytest.raises(HypervisorError):
        side.hv.begin_backup(spec.name, BackupPlan(
            (BackupTarget("vda", side.root / f"{spec.name}.copy"),), incremental_from="nope"))


def test_a_backup_is_refused_on_a_stopped_domain(side):
    spec = side.spec()
    side.hv.define(spec)
    target = side.root / f"{spec.name}.copy.qcow2"
    with pytest.raises(HypervisorError):
        side.hv.begin_backup(spec.name, BackupPlan((BackupTarget("vda", target),)))
    assert not target.exists()


def test_a_full_backup_with_a_new_checkpoint_then_an_incremental_one(side):
    guest = side.guest()
    first = side.root / f"{uuid.uuid4().hex[:6]}.full.qcow2"
    side.hv.begin_backup(guest.name, BackupPlan(
        (BackupTarget("vda", first),), skipped=("vdb",),
        new_checkpoint=NewCheckpoint("bbsnap-test-one", "vda", "contract test")))
    assert side.hv.has_checkpoint(guest.name, "bbsnap-test-one"), "made at the backup's instant"
    side.finish_job(guest.name)
    done = side.hv.completed_job(guest.name)
    assert (done.known, done.success) == (True, True), done.message
    assert qemu_img.info(first, "qcow2").virtual_size == qemu_img.info(
        Path(guest.disks[0].path), "qcow2", force_share=True).virtual_size
    second = side.root / f"{uuid.uuid4().hex[:6]}.incr.qcow2"
    side.hv.begin_backup(guest.name, BackupPlan(
        (BackupTarget("vda", second),), skipped=("vdb",), incremental_from="bbsnap-test-one"))
    side.finish_job(guest.name)
    assert side.hv.completed_job(guest.name).success
    assert qemu_img.check(second, force_share=True).clean
    side.hv.delete_checkpoint(guest.name, "bbsnap-test-one")
    assert not side.hv.has_checkpoint(guest.name, "bbsnap-test-one")
    first.unlink()
    second.unlink()


def test_a_held_backup_shows_its_progress_and_an_abort_removes_its_target(side):
    guest = side.guest()
    target = side.root / f"{uuid.uuid4().hex[:6]}.held.qcow2"
    side.hv.begin_backup(guest.name, BackupPlan((BackupTarget("vdb", target),),
                                                skipped=("vda",)))
    side.hold_job(guest.name)
    status = side.hv.job_status(guest.name)
    assert status.active and status.total >= HELD_DISK and status.processed < status.total
    assert status.percent is not None and 0 <= status.percent < 100
    side.hv.abort_job(guest.name)
    side.wait_job_gone(guest.name)
    assert not side.hv.completed_job(guest.name).success
    assert not target.exists(), "libvirt removes an aborted backup's target"


def test_a_disks_capacity_is_its_virtual_size(side):
    guest = side.guest()
    assert side.hv.disk_capacity(guest.name, "vdb") == HELD_DISK
    with pytest.raises(HypervisorError):
        side.hv.disk_capacity(guest.name, "vdz")


def test_a_backup_into_targets_the_caller_made_keeps_them_on_abort(side):
    """reuse_targets: bbsnap makes the target files (so libvirt hands them back to their
    owner); libvirt needs them to exist, and leaves them to the caller when the job ends."""
    guest = side.guest()
    target = side.root / f"{uuid.uuid4().hex[:6]}.reused.qcow2"
    plan = BackupPlan((BackupTarget("vdb", target),), skipped=("vda",), reuse_targets=True)
    with pytest.raises(HypervisorError):
        side.hv.begin_backup(guest.name, plan)  # not made yet
    assert not side.hv.job_status(guest.name).active
    qemu_img.create_blank(target, side.hv.disk_capacity(guest.name, "vdb"))
    side.hv.begin_backup(guest.name, plan)
    side.hold_job(guest.name)
    side.hv.abort_job(guest.name)
    side.wait_job_gone(guest.name)
    assert target.exists(), "a reused target is the caller's to remove"
    target.unlink()


# -- memory snapshots --------------------------------------------------------------------------
# On blank-disk domains (QEMU runs its firmware, no OS): a save and a restore need no guest.

def running(side: Side, **changes: object) -> DomainSpec:
    spec = side.spec(**changes)
    side.hv.define(spec)
    side.hv.start(spec.name)
    return spec


def test_hardware_is_what_a_memory_image_must_match(side):
    spec = side.spec(memory_mib=64, vcpus=1)
    side.hv.define(spec)
    before = side.hv.hardware(spec.name)
    assert (before.memory_kib, before.vcpus, before.host_devices) == (64 * 1024, 1, ())
    assert before.machine.startswith("pc"), before.machine
    assert "disk vda virtio disk" in before.devices
    side.hv.define(replace(spec, memory_mib=96, disks=(
        *spec.disks, DiskSpec(side.blank_disk(), target="vdb"))))
    found = mismatches(before, side.hv.hardware(spec.name))
    assert "RAM 64 MiB then, 96 MiB now" in found
    assert any("added disk vdb virtio disk" in f for f in found), found


def test_a_live_memory_save_leaves_the_domain_paused_with_its_definition(side):
    spec = running(side)
    saved_file = side.root / f"{spec.name}.save"
    side.hv.save_memory_live(spec.name, saved_file, ["vda"], [], 30)
    try:
        assert side.hv.info(spec.name).state is DomainState.PAUSED
        assert side.hv.pause_cause(spec.name) is PauseCause.OTHER, "not a user's pause"
        assert not side.hv.memory_save_running(spec.name), "the save has ended"
        assert saved_file.stat().st_mode & 0o077 == 0, "a saved RAM is its owner's alone"
        saved = side.hv.saved_domain(saved_file)
        assert (saved.name, saved.uuid) == (spec.name, spec.uuid)
        assert saved.disks == {"vda": str(spec.disks[0].path)}
        assert mismatches(saved.hardware, side.hv.hardware(spec.name)) == []
        # Read from a stream (a revert's FIFO path): the same domain, compared with the
        # definition as libvirt writes it into a save image.
        with saved_file.open("rb") as stream:
            head = side.hv.saved_head(stream)
        assert (head.domain.name, head.domain.uuid, head.domain.disks) == (
            saved.name, saved.uuid, saved.disks)
        assert saved_file.read_bytes().startswith(head.data)
        assert mismatches(head.domain.hardware,
                          side.hv.hardware(spec.name, migratable=True)) == []
    finally:
        side.hv.resume(spec.name)
    assert side.hv.info(spec.name).state is DomainState.RUNNING
    assert side.hv.pause_cause(spec.name) is PauseCause.NOT_PAUSED
    with pytest.raises(HypervisorError) as again:
        side.hv.resume(spec.name)  # libvirt refuses it: callers ask pause_cause first
    assert not isinstance(again.value, NotFoundError)
    assert side.hv.info(spec.name).state is DomainState.RUNNING
    saved_file.unlink()


def test_the_disks_instant_kept_in_the_pause_is_deleted_through_the_running_domain(side):
    """The capture's order (services/snapshots/memory.py): save, an internal snapshot with
    qemu-img while the domain is paused there, resume; later deleted through its QEMU."""
    spec = running(side)
    disk = Path(spec.disks[0].path)
    saved_file = side.root / f"{spec.name}.save"
    side.hv.save_memory_live(spec.name, saved_file, ["vda"], [], 30)
    try:
        qemu_img.snapshot_create(disk, "bbsnap-test-instant")
    finally:
        side.hv.resume(spec.name)
    assert qemu_img.snapshot_names(disk) == ["bbsnap-test-instant"]
    side.hv.delete_disk_snapshot(spec.name, str(disk), "bbsnap-test-instant")
    assert qemu_img.snapshot_names(disk) == []
    with pytest.raises(HypervisorError) as gone:
        side.hv.delete_disk_snapshot(spec.name, str(disk), "bbsnap-test-instant")
    assert not isinstance(gone.value, NotFoundError)
    with pytest.raises(HypervisorError):
        side.hv.delete_disk_snapshot(spec.name, str(side.root / "not-open.qcow2"), "x")
    saved_file.unlink()


def test_a_restore_runs_on_the_disks_it_is_given_with_the_current_descriptions(side):
    spec = running(side, title="then", metadata={"image_id": "img-aaaaa"})
    saved_file = side.root / f"{spec.name}.save"
    side.hv.save_memory_live(spec.name, saved_file, ["vda"], [], 30)
    side.hv.resume(spec.name)
    side.hv.destroy(spec.name)
    new_disk = side.root / f"{spec.name}.new.qcow2"
    qemu_img.create_overlay(new_disk, Path(spec.disks[0].path))
    side.hv.define(replace(spec, title="now", metadata={"image_id": "img-bbbbb"}))
    info = side.hv.restore_memory(saved_file, {"vda": new_disk})
    assert (info.name, info.uuid, info.state) == (spec.name, spec.uuid, DomainState.RUNNING)
    live = side.hv.facts(spec.name)
    assert live.disks == (str(new_disk),), "never the disk it was saved on"
    assert (live.title, live.metadata) == ("now", {"image_id": "img-bbbbb"})
    with pytest.raises(HypervisorError):
        side.hv.restore_memory(saved_file, {"vda": new_disk})  # it runs already
    assert side.hv.info(spec.name).state is DomainState.RUNNING
    saved_file.unlink()


def test_memory_refusals_and_a_users_pause(side):
    spec = side.spec()
    side.hv.define(spec)
    saved_file = side.root / f"{spec.name}.save"
    with pytest.raises(HypervisorError):
        side.hv.save_memory_live(spec.name, saved_file, ["vda"], [], 30)  # shut off
    assert not saved_file.exists()
    not_saved = side.root / f"{spec.name}.junk"
    not_saved.write_bytes(b"not a save image" * 64)
    with pytest.raises(HypervisorError):
        side.hv.saved_domain(not_saved)
    with pytest.raises(HypervisorError):
        side.hv.restore_memory(not_saved, {})
    assert side.hv.info(spec.name).state is DomainState.SHUTOFF
    side.hv.start(spec.name)
    assert side.hv.pause_cause(spec.name) is PauseCause.NOT_PAUSED
    side.user_pause(spec.name)
    assert side.hv.pause_cause(spec.name) is PauseCause.USER
    side.hv.resume(spec.name)
    assert side.hv.info(spec.name).state is DomainState.RUNNING


def test_a_guest_stopped_on_a_refused_write_is_paused_on_an_io_error(side):
    """What a snapshot whose copy fails on a full target runs again (services/snapshots/
    finish.py), where a user's pause (test_memory_refusals_and_a_users_pause) is left."""
    with side.stopped_on_a_write() as (spec, make_room):
        assert side.hv.info(spec.name).state is DomainState.PAUSED
        assert side.hv.pause_cause(spec.name) is PauseCause.IO_ERROR
        make_room()
        side.hv.resume(spec.name)  # QEMU retries the write kept, which has room now
        assert side.hv.info(spec.name).state is DomainState.RUNNING
        assert side.hv.pause_cause(spec.name) is PauseCause.NOT_PAUSED
