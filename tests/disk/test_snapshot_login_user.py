"""A snapshot of a domain bbsnap did not create takes its login user from the guest agent,
asked by the snapshot's worker while QEMU copies (never by the command: none of its
latency), on real qcow2 files against the fake hypervisor (tests/contract checks the fake's
answer against the real agent; tests/system/test_login_user.py runs it end to end)."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from bbsnap.errors import BbsnapError
from bbsnap.hypervisor import DiskSpec, DomainSpec, GuestUser
from bbsnap.models import Consistency, Image, ImageStatus
from bbsnap.services.snapshots.finish import SnapshotFinisher
from bbsnap.state.catalogue import Catalogue
from bbsnap.state.layout import DataDir
from bbsnap.services.snapshots.start import SnapshotRequest, SnapshotService
from bbsnap.state.locks import ServerLock
from tests.disk.fake_servers import Notes, create_request, server_creator, snapshot_service
from tests.disk.test_server_flows_fake import catalogue, data
from tests.fakes.hypervisor import FakeHypervisor

__all__ = ["catalogue", "data"]  # the fixtures, shared with test_server_flows_fake

MIB = 1 << 20
USERS = [GuestUser("admin", datetime(2026, 1, 1, 8, tzinfo=timezone.utc)),
         GuestUser("debian", datetime(2026, 1, 1, 9, tzinfo=timezone.utc)),
         GuestUser("root", datetime(2026, 1, 1, 10, tzinfo=timezone.utc))]


def _foreign(hv: FakeHypervisor, work_dir: Path, users: list[GuestUser]) -> str:
    """A running domain defined as virsh would: its own disk, no bbsnap metadata."""
    disk = work_dir / "users" / "vm.qcow2"
    disk.parent.mkdir(exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(64 * MIB)],
                   check=True)
    name = "vm-" + uuid.uuid4().hex[:6]
    hv.define(DomainSpec(name=name, uuid=str(uuid.uuid4()), memory_mib=128, vcpus=1,
                         accel="tcg", disks=(DiskSpec(disk),),
                         console_log=work_dir / "console.log"))
    hv.start(name)
    hv.set_guest_users(name, users)
    return name


def _finished(hv: FakeHypervisor, data: DataDir, catalogue: Catalogue, domain: str,
              image_id: str, notes: Notes | None = None) -> Image:
    """The snapshot made available: the fake's job done, then the worker's part."""
    hv.complete_job(domain)
    done = SnapshotFinisher(catalogue, data, lambda: hv, reporter=notes or Notes()).run(image_id)
    assert done.status is ImageStatus.AVAILABLE
    return done


def test_the_worker_records_the_agents_most_recent_non_root_user_and_says_so(
        data: DataDir, catalogue: Catalogue, work_dir: Path):
    hv = FakeHypervisor()
    name = _foreign(hv, work_dir, USERS)
    command_notes = Notes()
    image = snapshot_service(data, catalogue, hv, command_notes).begin(SnapshotRequest(name))
    # The command returned without asking: the instant is fixed, the question is the worker's.
    assert "logged_in_users" not in hv.calls and image.username is None
    assert not [n for n in command_notes.lines if "logged-in" in n]
    worker_notes = Notes()
    done = _finished(hv, data, catalogue, name, image.id, worker_notes)
    assert done.username == "debian" and catalogue.get(image.id).username == "debian"
    (note,) = [n for n in worker_notes.lines if "logged-in" in n]
    assert note.startswith("note:") and f"recorded as {image.id}'s login user" in note
    # asked once the instant was fixed, never inside the freeze window
    calls = hv.calls
    assert calls.index("logged_in_users") > calls.index("thaw") > calls.index("begin_backup")


@pytest.mark.parametrize("given", [True, False], ids=["--username", "--no-quiesce"])
def test_a_given_username_is_not_asked_about_and_no_quiesce_still_asks(
        data: DataDir, catalogue: Catalogue, work_dir: Path, given: bool):
    hv = FakeHypervisor()
    name = _foreign(hv, work_dir, USERS)
    request = (SnapshotRequest(name, username="cloud") if given
               else SnapshotRequest(name, quiesce=False))
    image = snapshot_service(data, catalogue, hv).begin(request)
    done = _finished(hv, data, catalogue, name, image.id)
    assert done.username == ("cloud" if given else "debian")
    assert ("logged_in_users" in hv.calls) is not given


@pytest.mark.parametrize("agent", ["silent-after-the-freeze", "none", "root-only"])
def test_without_an_answer_naming_a_user_the_image_records_none(
        data: DataDir, catalogue: Catalogue, work_dir: Path, agent: str):
    hv = FakeHypervisor()
    name = _foreign(hv, work_dir, [USERS[2]] if agent == "root-only" else USERS)
    if agent == "none":
        hv.set_guest_users(name, [])
    notes = Notes()
    image = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(name))
    assert image.consistency is Consistency.QUIESCED
    if agent == "silent-after-the-freeze":
        hv.silence_agent(name)
    done = _finished(hv, data, catalogue, name, image.id, notes)
    assert done.username is None and not [n for n in notes.lines if "logged-in" in n]
    assert "logged_in_users" in hv.calls  # asked, and the snapshot went on without one


class _RecordingLauncher:
    """Starts no worker: records what the command told it (the worker is the test's)."""

    def __init__(self) -> None:
        self.agent_silent: list[bool] = []

    def start(self, image_id: str, lock: ServerLock, log_path: Path, *,
              agent_silent: bool = False) -> int:
        self.agent_silent.append(agent_silent)
        return os.getpid()  # the job's owner is alive: this test, which runs the worker

    def release(self) -> None:
        pass


def test_an_agent_silent_at_the_freeze_is_not_asked_for_the_login_user_by_the_worker(
        data: DataDir, catalogue: Catalogue, work_dir: Path):
    """Each further question to a hung agent waits its timeout before the copy can be
    settled: the command tells the worker, which does not ask for the login user (2 s).
    It still sends its thaw: a slow agent may freeze after the command's timeout."""
    hv = FakeHypervisor()
    name = _foreign(hv, work_dir, USERS)
    hv.silence_agent(name)
    launcher = _RecordingLauncher()
    command_notes = Notes()
    image = SnapshotService(catalogue, data, hv, launcher,
                            reporter=command_notes).begin(SnapshotRequest(name))
    assert launcher.agent_silent == [True]
    assert image.consistency is Consistency.CRASH_CONSISTENT
    assert any("crash-consistent" in n for n in command_notes.lines)
    asked_by_the_command = list(hv.calls)
    hv.complete_job(name)
    worker_notes = Notes()
    done = SnapshotFinisher(catalogue, data, lambda: hv, reporter=worker_notes,
                            agent_silent=True).run(image.id)
    assert done.status is ImageStatus.AVAILABLE and done.username is None
    further = hv.calls[len(asked_by_the_command):]
    assert "logged_in_users" not in further and "freeze" not in further
    assert further.count("thaw") == 1  # the worker's precaution, as always
    assert worker_notes.lines == [f"note: the guest agent of {name} did not answer the freeze: "
                                  "not asked for the login user"]


@pytest.mark.parametrize("quiesce", [True, False], ids=["frozen", "--no-quiesce"])
def test_an_agent_that_answered_or_was_not_asked_is_not_called_silent(
        data: DataDir, catalogue: Catalogue, work_dir: Path, quiesce: bool):
    hv = FakeHypervisor()
    name = _foreign(hv, work_dir, USERS)
    launcher = _RecordingLauncher()
    SnapshotService(catalogue, data, hv, launcher).begin(SnapshotRequest(name, quiesce=quiesce))
    assert launcher.agent_silent == [False]


def test_a_stopped_domain_or_a_bbsnap_server_with_an_ancestor_is_not_asked(
        data: DataDir, catalogue: Catalogue, work_dir: Path):
    hv = FakeHypervisor()
    name = _foreign(hv, work_dir, USERS)
    hv.destroy(name)
    stopped = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(name))
    assert SnapshotFinisher(catalogue, data, lambda: hv).run(stopped.id).username is None
    creator, _ = server_creator(data, catalogue, hv, work_dir)
    server = creator.create(create_request(work_dir))
    hv.set_guest_users(server.id, [GuestUser("someone", USERS[1].login_time)])
    image = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(server.id))
    done = _finished(hv, data, catalogue, server.id, image.id)
    assert done.username == "debian" and done.ancestor_id == "img-base0"  # inherited
    assert "logged_in_users" not in hv.calls


def test_a_snapshot_stored_on_one_that_records_a_login_user_takes_it_without_asking(
        data: DataDir, catalogue: Catalogue, work_dir: Path):
    hv = FakeHypervisor()
    name = _foreign(hv, work_dir, USERS)
    first = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(name))
    assert _finished(hv, data, catalogue, name, first.id).username == "debian"
    catalogue.update(first.id, username="ops")  # what `images update -u ops` sets
    asked = hv.calls.count("logged_in_users")
    second = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(name))
    assert second.parent_id == first.id and second.username == "ops"
    assert _finished(hv, data, catalogue, name, second.id).username == "ops"
    assert hv.calls.count("logged_in_users") == asked
    # One that records none has the worker ask again: someone may have logged in since.
    catalogue.update(second.id, username=None)
    third = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(name))
    assert third.parent_id == second.id and third.username is None
    assert _finished(hv, data, catalogue, name, third.id).username == "debian"
    assert hv.calls.count("logged_in_users") == asked + 1


class _AgentAfterTheCopy(FakeHypervisor):
    """An agent that answers the worker (its thaw, its login-user question) only once the
    worker has looked at QEMU's job: a worker that waited for either before the copy (not
    beside it) would wait here until the bound, and fail or record no user."""

    def __init__(self) -> None:
        super().__init__()
        self.copy_seen = threading.Event()

    def job_status(self, name: str):  # type: ignore[no-untyped-def]
        self.copy_seen.set()
        return super().job_status(name)

    def _after_the_copy(self) -> None:
        if not self.copy_seen.wait(30):
            raise AssertionError("the worker waited for the agent before the copy")

    def logged_in_users(self, name: str, timeout: int) -> list[GuestUser]:
        self._after_the_copy()
        return super().logged_in_users(name, timeout)

    def thaw(self, name: str, timeout: int = 5) -> None:
        if self.calls.count("thaw"):  # the worker's (the command's own comes first)
            self._after_the_copy()
        super().thaw(name, timeout)


def test_the_question_runs_beside_the_copy_and_is_recorded_before_available(
        data: DataDir, catalogue: Catalogue, work_dir: Path):
    hv = _AgentAfterTheCopy()
    name = _foreign(hv, work_dir, USERS)
    image = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(name))
    threads = threading.active_count()
    done = _finished(hv, data, catalogue, name, image.id)
    assert done.username == "debian"  # in the very update that made it available
    assert threading.active_count() == threads  # the question's thread has ended


def test_a_failed_copy_leaves_no_question_running(data: DataDir, catalogue: Catalogue,
                                                  work_dir: Path):
    hv = _AgentAfterTheCopy()
    name = _foreign(hv, work_dir, USERS)
    image = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(name))
    threads = threading.active_count()
    hv.fail_job(name, "No space left on device")
    with pytest.raises(BbsnapError):
        SnapshotFinisher(catalogue, data, lambda: hv, reporter=Notes()).run(image.id)
    assert threading.active_count() == threads
    assert catalogue.get(image.id, include_deleted=True).status is ImageStatus.FAILED


def test_the_workers_thaw_runs_beside_the_copy_and_thaws_a_guest_left_frozen(
        data: DataDir, catalogue: Catalogue, work_dir: Path):
    """A command killed between its freeze and thaw leaves the guest frozen: the worker
    that takes the snapshot over still thaws it, now beside the copy, before available."""
    hv = _AgentAfterTheCopy()
    name = _foreign(hv, work_dir, USERS)
    image = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(name, username="cloud"))
    hv.freeze(name, 5)  # as a command killed inside its freeze window would leave it
    assert hv.is_frozen(name)
    done = _finished(hv, data, catalogue, name, image.id)
    assert not hv.is_frozen(name)
    assert done.username == "cloud" and "logged_in_users" not in hv.calls
