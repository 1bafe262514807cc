"""The background half of a snapshot: wait for the copy, make it a catalogue image.

Runs in a detached worker process (``python -m bbsnap.services.snapshots.worker finish-snapshot``),
holding the server's lock it inherited. Only after every disk is copied,
checked, synced and renamed into ``images/`` does the image turn available;
any failure marks it failed with the reason, aborts the copy and removes every
file the snapshot made. Re-running it for the same image (recovery after the
worker died) is safe: it picks the job up from the catalogue's journal.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from bbsnap import safe_files
from bbsnap.background import Background
from bbsnap.state.catalogue import Catalogue
from bbsnap.disks import direct_copy, qemu_img, reserve
from bbsnap.disks.writeback import Writeback
from bbsnap.disks.qcow2_header import Qcow2Header, read_qcow2_header
from bbsnap.errors import BbsnapError, HostileImageError, HypervisorError, NotFoundError
from bbsnap.hypervisor import Hypervisor, PauseCause
from bbsnap.state.process_tokens import current_job_token
from bbsnap.state.layout import FILE_MODE, DataDir
from bbsnap.models import Image, ImageStatus, ImageVolume, SnapshotDisk, SnapshotJob
from bbsnap.reporting import SILENT, Reporter
from bbsnap.services.snapshots import chain as snapshot_chain
from bbsnap.services.snapshots import login_user
from bbsnap.services.snapshots.timeline import Timeline

# Job polling (two libvirt calls per poll): how late the worker notices the copy's end is
# part of every snapshot's time until available, so the wait shortens as the job nears its
# end (see _PollPace); far from it, POLL_SECONDS keeps the polling cheap.
POLL_SECONDS = 0.05
MIN_POLL_SECONDS = 0.005
RECONNECT_SECONDS = 120.0  # how long a restarting libvirtd may stay away


class SnapshotFailed(BbsnapError):
    """The copy did not complete; the image is marked failed with this reason."""


class SnapshotFinisher:
    def __init__(self, catalogue: Catalogue, data_dir: DataDir,
                 connect: Callable[[], Hypervisor], *, timeline: Timeline | None = None,
                 handed_over: Callable[[], None] | None = None,
                 reporter: Reporter = SILENT, agent_silent: bool = False) -> None:
        self._catalogue = catalogue
        # The command that forked this worker found the guest agent silent (its freeze
        # waited out start.FREEZE_TIMEOUT): asking it for the login user would wait 2 s
        # more before the copy could be settled. The thaw below is still sent: an agent
        # slow rather than hung may freeze after that timeout (a freeze flushes the
        # guest's dirty data first), and a guest left frozen is far worse than 5 s.
        self._agent_silent = agent_silent
        self._reporter = reporter  # the worker's log
        # Returns once the command that forked this worker has made its last change to the
        # image's row (worker.ForkedWorker): only then may the row turn available or failed.
        self._handed_over = handed_over or (lambda: None)
        self._data_dir = data_dir
        self._connect = connect
        self._timeline = timeline or Timeline()  # when each step ended (the benchmark's breakdown)
        self._hv = connect()  # connects on its first call
        self._timeline.mark("ready")

    def run(self, image_id: str) -> Image:
        image = self._catalogue.get(image_id, include_deleted=True)
        if image.status is not ImageStatus.CREATING:
            return image
        # Not fsynced: a forked worker's claim comes while the command that forked it is
        # about to commit, and SQLite holds the write lock through a commit's fsync, which
        # waits behind the copy's writeback (the command's commit took 6-8 ms more). Lost to
        # a power cut, the row names a dead job, which recovery adopts as it would this one.
        with self._catalogue.unsynced_commits():
            self._catalogue.update(image_id, job=current_job_token())
        job = self._catalogue.snapshot_job(image_id)
        if job is not None and job.mode == "memory":
            # A command killed during the memory save, or before it resumed the guest, left
            # it paused (or libvirtd is about to): running again before anything else.
            try:
                _memory_hook().resume_unless_user_paused(self._hv, job.domain)
            except BbsnapError:
                pass  # gone, or libvirtd away for good: the guest is not ours to wait for
        # The guest agent's part, in a thread beside the copy (_AgentErrands): the thaw, then
        # the login user's question (a memory snapshot's guest is running again by now).
        errands = self._agent_errands(image, job) if job is not None else None
        self._timeline.mark("login-user")  # asked (the answer comes beside the copy)
        try:
            if job is None:
                raise SnapshotFailed("its job journal is missing")
            if job.mode == "backup":
                self._wait_for_backup(image_id, job)
            elif job.mode == "memory":
                _memory_hook().copy_disks(job, image_id, _ProgressReport(self._catalogue,
                                                                      image_id, job))
                _memory_hook().forget_disk_states(self._hv, job, image_id)
            else:
                self._copy_shut_off_disks(image_id, job)
            volumes = [self._store_disk(image_id, index, disk, job.mode)
                       for index, disk in enumerate(job.disks)]
            memory = (_memory_hook().store(self._data_dir, image_id) if job.mode == "memory"
                      else None)
            if errands is not None:
                self._record_login_user(image_id, job.domain, errands)
        except BaseException as exc:
            if errands is not None:
                errands.join()  # bounded by the agent's timeouts: no thread left asking
            self._handed_over()
            self._fail(image_id, job, _reason(exc))
            raise
        self._handed_over()
        primary = volumes[0]
        image = self._catalogue.finish_snapshot(
            image_id, volumes[1:], status=ImageStatus.AVAILABLE, path=primary.path,
            virtual_size=primary.virtual_size,
            disk_size=sum(v.disk_size for v in volumes) + (memory[1] if memory else 0),
            memory_path=memory[0] if memory else None, job=None)
        self._timeline.mark("available")
        made = job.disks[0].checkpoint
        if job.mode == "backup" and made:
            # Only now is the previous checkpoint superseded: the next snapshot starts here.
            snapshot_chain.prune(self._hv, job.domain, keep=made)
        return image

    def _agent_errands(self, image: Image, job: SnapshotJob) -> _AgentErrands | None:
        """What the guest agent is sent beside the copy (None: nothing).

        The thaw (backup mode): a command killed between freeze and thaw would leave the
        guest frozen, and thawing an unfrozen guest is harmless, so every worker thaws, an
        adopting one too. Sent at once, as before, but no longer waited for before the
        copy: it was 4-8 ms of a small full copy's time until available (sixteenth
        session).

        The login user's question: a running guest's snapshot with no login user to take
        (none given, no ancestor, no earlier snapshot it is stored on that records one: a
        domain bbsnap did not create) asks the guest agent (login_user.py). Here, not in the
        command (the agent's round trip was 11-21 ms of its latency), and beside the copy
        and its storing, not before them (a small disk's copy is done before the agent
        answers: 15 ms of a 64 MiB full copy's ~190 ms until available). An agent that is
        absent answers at once, a silent one within login_user.AGENT_TIMEOUT; either way
        the snapshot goes on without a login user."""
        ask = not (image.username or image.ancestor_id or job.mode == "copy")
        if ask and self._agent_silent:
            self._reporter.note(f"the guest agent of {job.domain} did not answer the freeze: "
                                "not asked for the login user")
            ask = False
        thaw = job.mode == "backup"
        if not (thaw or ask):
            return None
        return _AgentErrands(self._hv, job.domain, thaw=thaw, ask=ask)

    def _record_login_user(self, image_id: str, domain: str,
                           answer: _AgentErrands) -> None:
        """The answer, once the copy is stored, written before the image turns available."""
        username = answer.username()
        if username:
            login_user.note(self._reporter, domain, image_id, username)
            # Not fsynced: the fsynced commit that makes the image available covers it.
            with self._catalogue.unsynced_commits():
                self._catalogue.update(image_id, username=username)

    # -- copying ------------------------------------------------------------------------------

    def _wait_for_backup(self, image_id: str, job: SnapshotJob) -> None:
        report = _ProgressReport(self._catalogue, image_id, job)
        pace = _PollPace()
        # The copy is written out while QEMU makes it, not all at its end (disks/writeback.py);
        # one in RAM is copied onto the disk after the job (_store_disk).
        with Writeback([Path(d.target) for d in job.disks
                        if not self._data_dir.is_qemu_ram_file(Path(d.target))]):
            while True:
                try:
                    status = self._hv.job_status(job.domain)
                except NotFoundError:
                    raise SnapshotFailed(f"server {job.domain} was destroyed during the copy"
                                         ) from None
                except HypervisorError:
                    self._reconnect()
                    continue
                if not status.active:
                    self._timeline.mark("copied")
                    break
                report(status.percent)
                time.sleep(pace.next(status.processed, status.total))
        try:
            outcome = self._hv.completed_job(job.domain)
        except NotFoundError:
            raise SnapshotFailed(f"server {job.domain} was destroyed during the copy") from None
        except HypervisorError as exc:
            raise SnapshotFailed(f"the copy's outcome is unknown: {exc}") from exc
        if outcome.elapsed_seconds is not None:
            self._timeline.duration("job", outcome.elapsed_seconds)
        if not outcome.known:
            raise SnapshotFailed(outcome.message)
        if not outcome.success:
            raise SnapshotFailed(f"the copy failed: {outcome.message}")
        missing = [d.target for d in job.disks if not Path(d.target).exists()]
        if missing:
            raise SnapshotFailed(f"the copy reported success but {missing[0]} is missing")
        self._timeline.mark("outcome")

    def _copy_shut_off_disks(self, image_id: str, job: SnapshotJob) -> None:
        """A shut-off server: copy its disks directly (the lock keeps bbsnap from starting it)."""
        report = _ProgressReport(self._catalogue, image_id, job)
        for index, disk in enumerate(job.disks):
            def progress(percent: float, index: int = index) -> None:  # of this disk
                report(min(99, int((index * 100 + percent) / len(job.disks))))
            if disk.ancestor:
                qemu_img.convert_top(Path(disk.source), Path(disk.target), Path(disk.ancestor),
                                     progress=progress)
            else:
                qemu_img.convert(Path(disk.source), disk.source_format, Path(disk.target),
                                 "qcow2", progress=progress)

    def _reconnect(self) -> None:
        deadline = time.monotonic() + RECONNECT_SECONDS
        while True:
            try:
                self._hv.close()
            except Exception:
                pass
            try:
                self._hv = self._connect()
                self._hv.version()
                return
            except HypervisorError as exc:
                if time.monotonic() >= deadline:
                    raise SnapshotFailed(f"lost the connection to libvirt: {exc}") from exc
                time.sleep(1.0)

    # -- storing ------------------------------------------------------------------------------

    def _store_disk(self, image_id: str, index: int, disk: SnapshotDisk, mode: str) -> ImageVolume:
        copy = Path(disk.target)
        in_ram = self._data_dir.is_qemu_ram_file(copy)  # a standalone full copy (targets.py)
        if not disk.incremental and mode == "backup" and not in_ram:
            reserve.release(copy)  # what the copy did not use of the blocks start.py reserved
        if disk.ancestor and disk.incremental:
            # Only the clusters written since the parent's instant were copied (its checkpoint,
            # services/snapshots/chain.py): that already is the delta; name its base. libvirt
            # made the copy with the server's running disk as its backing file, which
            # `qemu-img check` could not open (QEMU holds its write lock): rename it first.
            qemu_img.set_backing(copy, Path(disk.ancestor))
        elif disk.ancestor and mode == "backup":
            copy = self._as_delta(copy, Path(disk.ancestor))
        self._timeline.mark(f"delta-{disk.device}")
        own_copy = mode == "backup" and not disk.ancestor
        if own_copy:
            # A standalone file QEMU's own job wrote and closed cleanly, untouched since:
            # its header, read here, is what a check could find wrong short of a QEMU bug;
            # `qemu-img check` (and `info` below) cost a process and a pass over every table,
            # 10-20 ms each here, more on a loaded host, in every full copy's time.
            header = _vet_own_copy(copy, disk.device)
        else:
            verdict = qemu_img.check(copy)
            if verdict.corruptions:
                raise SnapshotFailed(f"the copy of {disk.device} is corrupt "
                                     f"({verdict.corruptions} errors)")
        self._timeline.mark(f"checked-{disk.device}")
        if disk.ancestor and disk.incremental:
            # Named from images/, where both files live (after the check: from tmp/ the
            # relative name would not resolve).
            qemu_img.set_backing(copy, Path(disk.ancestor), relative=True)
        name = f"{image_id}.qcow2" if index == 0 else f"{image_id}-{disk.device}.qcow2"
        final = self._data_dir.images_dir / name
        if in_ram:
            try:
                direct_copy.publish_from_ram(copy, final, mode=FILE_MODE)
            except OSError as exc:
                raise SnapshotFailed(f"the copy of {disk.device} could not be written to "
                                     f"{final.parent}: {exc.strerror or exc}") from exc
            copy.unlink()
        else:
            safe_files.publish(copy, final, mode=FILE_MODE)
        self._timeline.mark(f"published-{disk.device}")
        if own_copy:
            virtual_size, actual_size = header.virtual_size, os.stat(final).st_blocks * 512
        else:
            info = qemu_img.info(final, "qcow2")
            virtual_size, actual_size = info.virtual_size, info.actual_size
        self._timeline.mark(f"measured-{disk.device}")
        return ImageVolume(disk.device, name, virtual_size, actual_size)

    def _as_delta(self, full_copy: Path, ancestor: Path) -> Path:
        """Keep only what differs from the ancestor: an overlay on the full copy, safely rebased
        onto the ancestor, holds exactly the clusters where the two differ."""
        delta = full_copy.with_name(full_copy.name.replace(".copy.", ".delta."))
        qemu_img.create_overlay(delta, full_copy)
        qemu_img.rebase(delta, ancestor)
        full_copy.unlink()
        return delta

    def _fail(self, image_id: str, job: SnapshotJob | None, reason: str) -> None:
        if job is not None and job.mode == "backup":
            try:
                if self._hv.job_status(job.domain).active:
                    self._hv.abort_job(job.domain)
            except BbsnapError:
                pass
            _resume_if_stopped_by_the_copy(self._hv, job.domain)
            made = job.disks[0].checkpoint if job.disks else None
            if made:
                # The chain goes on from the last available snapshot's checkpoint, which
                # still records every write since its instant (libvirt keeps all active).
                snapshot_chain.forget(self._hv, job.domain, made)
        if job is not None and job.mode == "memory":
            _memory_hook().forget_disk_states(self._hv, job, image_id)
        self._data_dir.remove_image_files(image_id)
        self._catalogue.fail_snapshot(image_id, reason)


def _resume_if_stopped_by_the_copy(hv: Hypervisor, domain: str) -> None:
    """A copy that failed on its target (a full file system) fails the guest's writes too:
    copy-before-write must save a cluster's old data before the guest overwrites it, and
    QEMU stops a guest on ENOSPC (the disks' default werror=enospc) with the write kept for a
    retry. The job is over, so the retry goes to the guest's own disk: run it again. (QEMU
    7.2's on-cbw-error=break-snapshot would spare the guest this; libvirt 9.0 cannot set
    it.) A guest whose own disk is full stops again at once; one a user paused stays so."""
    try:
        if hv.pause_cause(domain) is PauseCause.IO_ERROR:
            hv.resume(domain)
    except BbsnapError:
        pass  # gone, or libvirtd away: nothing to run again


def _vet_own_copy(copy: Path, device: str) -> Qcow2Header:
    """The header of a full copy QEMU made: a plain standalone qcow2, closed cleanly."""
    try:
        with open(copy, "rb") as handle:
            header = read_qcow2_header(handle, max_virtual_size=1 << 62)
    except (OSError, HostileImageError) as exc:
        raise SnapshotFailed(f"the copy of {device} is not a sound qcow2: {exc}") from exc
    if header.dirty:
        raise SnapshotFailed(f"the copy of {device} was not closed cleanly (dirty flag)")
    return header


class _PollPace:
    """How long to sleep before the next poll: half the time the job should still need at
    the rate it has copied so far, between MIN_POLL_SECONDS and POLL_SECONDS. So a long copy
    is polled every 50 ms until its last ~100 ms, and its end (QEMU's final flush too, once
    everything is copied) is seen within ~5 ms instead of ~25 ms on average."""

    def __init__(self) -> None:
        self._first: tuple[float, int] | None = None  # the first poll: (when, bytes copied)

    def next(self, processed: int, total: int) -> float:
        now = time.monotonic()
        if self._first is None:
            self._first = (now, processed)
        since, copied = now - self._first[0], processed - self._first[1]
        if copied <= 0 or since <= 0:
            # No rate yet: a small copy ends very soon; one that stands still (throttled)
            # is polled at the slow pace.
            return MIN_POLL_SECONDS * 2 if since < 10 * POLL_SECONDS else POLL_SECONDS
        remaining = max(0, total - processed) * since / copied
        return min(POLL_SECONDS, max(MIN_POLL_SECONDS, remaining / 2))


class _ProgressReport:
    """How far a copy has got, for `images show` and `--wait`: the percent and the targets'
    growing size, written at most every half second (each write is a catalogue commit)."""

    def __init__(self, catalogue: Catalogue, image_id: str, job: SnapshotJob) -> None:
        self._catalogue = catalogue
        self._image_id = image_id
        self._job = job
        self._last = 0.0

    def __call__(self, percent: int | None) -> None:
        now = time.monotonic()
        if now - self._last >= 0.5:
            self._catalogue.update(self._image_id, disk_size=_allocated(self._job),
                                   progress=percent)
            self._last = now


def _allocated(job: SnapshotJob) -> int:
    total = 0
    for disk in job.disks:
        try:
            total += os.stat(disk.target).st_blocks * 512
        except OSError:
            pass
    return total


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return str(exc) or type(exc).__name__


def _memory_hook() -> Any:
    """services/snapshots/memory.py, imported only for a memory snapshot: it brings the
    memory file's compression libraries, ~15-20 ms of every other snapshot's imports."""
    from bbsnap.services.snapshots import memory

    return memory


class _AgentErrands:
    """The guest agent sent a thaw and asked for the login user (login_user.ask), in that
    order, in a thread of its own (libvirt lets go of the GIL while it waits); the
    catalogue stays the worker's thread's."""

    def __init__(self, hv: Hypervisor, domain: str, *, thaw: bool, ask: bool) -> None:
        self._answer: list[str | None] = []

        def run() -> None:
            if thaw:
                try:
                    hv.thaw(domain)
                except BbsnapError:
                    pass
            if ask:
                self._answer.append(self._ask(hv, domain))

        self._thread = Background(run, name="guest-agent")

    @staticmethod
    def _ask(hv: Hypervisor, domain: str) -> str | None:
        try:
            return login_user.ask(hv, domain)
        except BbsnapError:
            return None  # the domain is gone or libvirt away: the copy's wait says so

    def join(self) -> None:
        self._thread.join()

    def username(self) -> str | None:
        """The login user the agent named; None if it named none or was not asked."""
        self._thread.join()
        return self._answer[0] if self._answer else None
