"""Snapshot a server into the image catalogue: fix the point in time now, copy in the background.

Mechanism: push-mode backup (libvirt ``backupBegin``), not external snapshot +
copy + block commit. Why:
- the point in time is fixed when ``backupBegin`` returns (~50 ms); QEMU then
  copies the disks as they were at that instant (copy-before-write) while the
  guest keeps writing;
- the guest's disk chain and domain definition are never touched, so a crash of
  bbsnap, of libvirtd or of the host mid-copy cannot leave the guest running on
  a temporary overlay (the external-snapshot route needs a journal and a block
  commit to undo that, and Debian 12's AppArmor profile denies that commit);
- all disks in one backup job share the same instant;
- libvirt removes a failed or aborted job's target itself.
Snapshots of a running single-disk qcow2 server form a chain (snapshot_chain): the
backup copies only what was written since the previous snapshot and creates the next
checkpoint at the same instant; the copy is stored as a delta on the previous snapshot.
Otherwise the copy is a full image of what the guest sees; when the server's disk is an
overlay on a catalogue image, the worker turns it into a delta on that image
(see snapshot_finish). Shut-off servers are copied with qemu-img instead.

Full copies (a domain bbsnap did not make, a raw disk, a multi-disk server, a tracking
fallback) stay with the push-mode job too, as measured here (QEMU 7.2, TCG guest, a disk
holding 1 GiB; issue #15): `qemu-img convert -W -O qcow2` of the disk 0.6-1.3 s and 1.4 s
with an fsync of its output (which it does not do itself: it leaves its copy in the page
cache); the push job 1.2-2.3 s (it flushes its target at its end), 0.9-1.3 s, median 1.0 s,
once the worker starts the copy's writeback while QEMU makes it (disks/writeback.py);
pull-mode backup read over NBD by `qemu-img convert -W -m 16` 2.9-3.2 s and by `nbdcopy`
(4 connections, 16 requests) 6.6-6.9 s: QEMU's NBD server runs in its main loop beside the
TCG vCPU. The job's `x-perf` knobs (max-workers, max-chunk) are set only when a QEMU 7.2
backup job starts, and libvirt 9.0's backup XML has no way to pass them; reaching them
would mean a job libvirt does not know, started through the monitor, so bbsnap does not.
A preallocated target would make every cluster of the image allocated, and lazy refcounts
on the target measured no better (1.0-3.1 s against 1.2-6.2 s for the same rounds). What
did help (ninth session): a full copy's target over 512 MiB gets its L2 tables before the
job (qemu_img.map_as_zero: the job otherwise stops at each new 512 MiB while QEMU flushes
the target with the copy dirty) and its blocks reserved (disks/reserve.py): QEMU's job on
an 8 GiB disk holding 1 GiB 1.48 -> 1.08 -> 0.82 s, the copy until available 1.42x ->
1.23x -> 1.02x `convert` + fsync (scripts/bench_snapshot.py --full-copy).
O_DIRECT for the target is out of reach: libvirt 9.0 opens a push backup's target with
cache.direct=off and no-flush=off whatever the disk's own cache mode (QEMU's
query-named-block-nodes during a job, a cache='none' disk's included), and the backup XML
has no cache setting. What the guest feels during a full copy (scripts/bench_guest_view.py:
its longest write gap at 8 GiB / 1 GiB of data 0.27-0.83 s over runs) comes from the
filesystem, not QEMU: its flush of its own disk waits behind the copy's writeback (a QEMU
trace showed it complete only as the target's flushes did; with the target on tmpfs the
gap was 75 ms against 280 ms). It was not made shorter by the worker's writeback kicks at
the idle I/O class (ioprio_set around sync_file_range): 642 ms against 775 ms at the normal
class in back-to-back runs, inside this host's spread, and the code was not kept (this
host's disks use the `none` I/O scheduler, which ignores I/O priorities).
So since the thirteenth session a standalone full copy is written by QEMU into RAM
(DataDir.qemu_ram_dir, when the host can spare it: targets.RamBudget) and copied onto the
disk after the job with O_DIRECT, two 4 MiB writes in flight (disks/direct_copy.py).
Measured back to back on the 8 GiB disk holding 1 GiB (scripts/bench_guest_view.py): the
guest's longest write gap 104 ms against 348 ms with the copy in tmp/, the host's fdatasync
probe 13 ms against 190 ms, p99 write latency 41 against 106 ms; at 64 MiB 43 against 58 ms.
What is left is QEMU's own (fourteenth session): the same push job started by libvirt
alone (backupBegin into RAM, no checkpoint, no worker), interleaved on the same guest,
stalls it as long (bench_guest_view.py prints that floor): 595 and 372 ms against the full
copy's 695 and 364 ms at 8 GiB in two runs, 24-25 against 37-38 ms at 64 MiB; with the
checkpoint bbsnap's job makes in the floor's job too, 86 against 68 ms and 43 against 29 ms
(the checkpoint is most of the 64 MiB difference). Per guest
instance the stall is either ~60 ms or ~300-600 ms, for every window of that guest, and
neither giving the login user (no agent query), holding the worker's job polls back 0.6 s
nor renicing QEMU's thread-pool workers to 19 moved it. Pull mode, which would let bbsnap
pace the reads, is out on QEMU 7.2: with the disk in an iothread (as domain_xml.py puts
it) QEMU aborted (`nbd_blockdev_client_closed: Assertion qemu_in_main_thread() &&
nbd_server`) and took the guest down when a pull job ended after `qemu-img convert` had
read its export. The price is the copy onto the disk after the job instead of beside it:
until available 1.42 s against 0.73 s on an idle guest (bench_snapshot.py --full-copy; 0.60 s
of it the copy out), and as fast at 64 MiB (0.24 against 0.31 s: the job in RAM is faster).

Quiescing: the guest agent freezes the filesystems (bounded by the agent
timeout), the backup begins, and the thaw runs in a ``finally``. Without an
answering agent the snapshot is crash-consistent, and the image says so.
"""

from __future__ import annotations

from bbsnap.lazy_dataclass import dataclass
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bbsnap import ids
from bbsnap.state import locks
from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.errors import (CheckpointBrokenError, ConflictError, GuestAgentSilentError,
                           HypervisorError, QuiesceError)
from bbsnap.hypervisor import (BackupPlan, BackupTarget, DiskInfo, DomainState, Hypervisor,
                               NewCheckpoint)
from bbsnap.state.process_tokens import current_job_token, token_for_pid
from bbsnap.state.layout import DataDir
from bbsnap.reporting import SILENT, Reporter
from bbsnap.models import (Consistency, Image, ImageStatus, ImageType, Server, SnapshotDisk,
                           SnapshotJob)
from bbsnap.services import image_fields, server_disks
from bbsnap.services.snapshots import change_tracking
from bbsnap.services.snapshots import targets as snapshot_targets
from bbsnap.services.snapshots import chain as snapshot_chain
from bbsnap.services.server_records import server_from_domain
from bbsnap.services.snapshots.chain import ChainPlan, ChainPlanner, ServerDisk
from bbsnap.services.snapshots.timeline import COMMAND as timeline
from bbsnap.services.snapshots.timeline import COMMAND_PREFIX

if TYPE_CHECKING:
    from bbsnap.services.snapshots.worker import WorkerLauncher

FREEZE_TIMEOUT = 5  # seconds the agent may take to freeze (or thaw) before we give up on it
DEFAULT_MAX_CHAIN_DEPTH = 32  # files opening a snapshot may take (config: max_chain_depth)


@dataclass(frozen=True)
class SnapshotRequest:
    server: str
    name: str | None = None
    quiesce: bool = True
    # The guest's login user for `servers ssh` on clones; else the ancestor's. A domain
    # bbsnap did not make has no ancestor to inherit one from: its guest agent is asked.
    username: str | None = None
    memory: bool = False  # also the guest's RAM and device state (memory_snapshot.py)


class SnapshotService:
    def __init__(self, catalogue: Catalogue, data_dir: DataDir, hypervisor: Hypervisor,
                 launcher: WorkerLauncher, *,
                 max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
                 reporter: Reporter = SILENT) -> None:
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._hv = hypervisor
        self._launcher = launcher  # starts the worker that finishes the copy (worker.py)
        self._chains = ChainPlanner(catalogue, data_dir, hypervisor, max_chain_depth)
        self._reporter = reporter

    def begin(self, request: SnapshotRequest) -> Image:
        """Register the image as creating, fix the point in time, hand the copy to a worker."""
        timeline.mark("begin")
        info = self._hv.info(request.server)
        timeline.mark("looked-up")
        lock = locks.acquire(self._data_dir.locks_dir, info.uuid,
                             on_wait=lambda: self._reporter.waiting(
                                 f"another operation on {request.server}"),
                             timeout=self._data_dir.lock_timeout,
                             purpose=f"snapshot of {info.name}")
        try:
            # Read again under the lock (a waited-for operation may have changed it), once:
            # every libvirt round trip here adds to the command's latency.
            timeline.mark("locked")
            info = self._hv.info(info.name)
            facts = self._hv.facts(info.name)
            timeline.mark("read")
            server = server_from_domain(self._hv, info, facts=facts)
            all_disks = facts.file_disks
            disks = [d for d in all_disks if d.writable]
            if not disks:
                raise ConflictError(f"server {server.id} has no writable file-backed disk")
            running = info.state in (DomainState.RUNNING, DomainState.PAUSED)
            memory_bytes = (_memory_hook().check(self._hv, server.id, info.state)
                            if request.memory else 0)
            image_id = self._new_image_id()
            ancestor = self._ancestor(server_disks.base_image_id(self._data_dir, server,
                                                                  disks[0]))
            directory = server_disks.directory(self._data_dir, server)
            chain = ServerDisk(server.id, server.uuid, disks[0], directory)
            plan = (self._chains.plan(image_id, chain, ancestor)
                    if running and len(disks) == 1 and not request.memory
                    else ChainPlan(None, ancestor, None))
            if plan.note:
                self._reporter.note(plan.note)
            mode = ("memory" if request.memory else "backup") if running else "copy"
            # QEMU's job writes a standalone full copy into RAM when it can be spared.
            ram = snapshot_targets.RamBudget(self._data_dir) if mode == "backup" else None
            job = SnapshotJob(
                domain=server.id, domain_uuid=server.uuid, mode=mode,
                disks=tuple(self._plan_disk(image_id, index, disk, plan, ram)
                            for index, disk in enumerate(disks)))
            consistency = Consistency.CRASH_CONSISTENT
            timeline.mark("planned")
            image = self._catalogue.add(
                self._draft(image_id, request, server, ancestor, consistency, plan.parent),
                snapshot_job=job, depends_on=plan.parent.id if plan.parent else None,
                chain_link=self._chains.link(image_id, chain, plan))
            # Closed now (put_aside, see below): its close checkpoints the WAL into the main
            # file, whose fsync here waits for nothing, while later it would queue behind
            # the copy's writeback (7-10 ms measured just before the fork).
            self._catalogue.put_aside()
            timeline.mark("registered")
            try:
                read_only = [d.target for d in all_disks if not d.writable]
                agent_silent = False
                if job.mode == "memory":
                    _memory_hook().capture(self._hv, self._data_dir, image_id, job, read_only,
                                           memory_bytes)
                elif running:
                    consistency, agent_silent = self._fix_point_in_time(
                        image_id, job, read_only, request.quiesce, ancestor, directory)
                # Started only now, not before the freeze to overlap its start-up with the
                # backup's: on two cores with a TCG guest on one, a starting worker took
                # the CPU from the command (latency 0.53 -> 0.68 s) and the image was not
                # available any sooner (0.89 -> 0.94 s, 64 MiB full copy, 6 rounds).
                # The login user, when the guest agent is to be asked, is the worker's
                # to ask while QEMU copies (finish.py): none of the command's latency.
                changes: dict[str, Any] = {"consistency": consistency}
                # A forked worker must not share this process's libvirt connection (one
                # RPC stream) nor its SQLite one (catalogue.put_aside; closed already unless
                # a step since reopened it): both are closed, and reopened here if a later
                # step needs them.
                self._hv.close()
                self._catalogue.put_aside()
                timeline.mark("put-aside")
                worker = _spawn_worker(self._launcher, self._data_dir, image.id, lock,
                                       agent_silent=agent_silent)
                timeline.mark("forked")
                try:
                    # One commit once the copy runs, and not fsynced: an fsync now waits
                    # behind the copy's writeback (7-9 ms here, 27 ms at 8 GiB). Lost to a
                    # power loss, the row is as a crash right before this commit leaves
                    # it (creating, this command's dead job: recovery fails it); else the
                    # worker's fsynced commit that makes it available covers it too. The
                    # worker settles the row only after this commit (release).
                    if worker:
                        changes["job"] = worker
                    with self._catalogue.unsynced_commits():
                        image = self._catalogue.update(image.id, **changes)
                    timeline.mark("recorded")
                    timeline.append_to(self._data_dir.logs_dir / f"{image.id}.log",
                                       COMMAND_PREFIX)
                    timeline.clear()  # a command snapshotting several servers: each its own
                finally:
                    self._launcher.release()
            except BaseException as exc:
                if job.mode == "memory":
                    _memory_hook().forget_disk_states(self._hv, job, image.id)
                self._catalogue.fail_snapshot(image.id, f"could not start the snapshot: {exc}")
                self._data_dir.remove_image_files(image.id)
                raise
            return image
        finally:
            lock.release()  # the worker holds its own copy of the lock until it is done

    def _draft(self, image_id: str, request: SnapshotRequest, server: Server,
               ancestor: Image | None, consistency: Consistency, parent: Image | None) -> Image:
        arch = ancestor.arch if ancestor else image_fields.host_arch()
        stamp = datetime.now().strftime("%d %b %H:%M")
        name = request.name or f"Snapshot of {server.id} {stamp} ({arch})"
        return Image(
            id=image_id, type=ImageType.SNAPSHOT,
            owner=ancestor.owner if ancestor else (server.owner or "local"),
            created_at=utcnow(), status=ImageStatus.CREATING,
            name=image_fields.check_name(name), arch=arch,
            description=f"Snapshot of server {server.id} ({server.name})",
            ancestor_id=ancestor.id if ancestor else None, parent_id=parent.id if parent else None,
            source_server=server.id,
            consistency=consistency, firmware=server.firmware,
            username=(image_fields.check_username(request.username) if request.username
                      else ancestor.username if ancestor
                      else parent.username if parent else None),
            min_ram=ancestor.min_ram if ancestor else None, job=current_job_token())

    def _ancestor(self, image_id: str | None) -> Image | None:
        """The catalogue image the server's disk was built from, if it is still there (a
        bbsnap server's, or the one a revert put a domain bbsnap did not create on)."""
        if not image_id:
            return None
        try:
            image = self._catalogue.get(image_id)
        except Exception:
            return None
        return image if image.status is ImageStatus.AVAILABLE else None

    def _plan_disk(self, image_id: str, index: int, disk: DiskInfo,
                   plan: ChainPlan, ram: snapshot_targets.RamBudget | None) -> SnapshotDisk:
        """The first disk is stored on the plan's parent; further disks are standalone."""
        target = self._data_dir.tmp_dir / f"{image_id}.{disk.target}.copy.qcow2"
        parent_file = (self._data_dir.image_path(plan.parent.path)
                       if index == 0 and plan.parent and plan.parent.path else None)
        incremental = parent_file is not None and plan.incremental
        if parent_file is None and ram is not None:  # a standalone full copy
            target = ram.target(image_id, disk.target, disk.path, disk.format) or target
        return SnapshotDisk(device=disk.target, source=disk.path, source_format=disk.format,
                            target=str(target), ancestor=str(parent_file) if parent_file else None,
                            incremental=incremental, since=plan.since if incremental else None,
                            checkpoint=plan.checkpoint if index == 0 else None)

    def _fix_point_in_time(self, image_id: str, job: SnapshotJob, read_only: list[str],
                           quiesce: bool, ancestor: Image | None,
                           directory: Path) -> tuple[Consistency, bool]:
        """The backup begun, the guest frozen around its start when *quiesce*: the image's
        consistency, and whether the agent was silent (the worker then skips the login user)."""
        domain = job.domain
        # The targets first, then the freeze: the guest stays frozen only for the backup's
        # start (making them used to be inside the freeze window; now copies, ~0.3 ms).
        snapshot_targets.make(self._data_dir, self._hv, job)
        # The plan too: its classes made now (lazy_dataclass.py), not inside the freeze.
        plan = _backup_plan(job.disks, read_only)
        timeline.mark("targets")
        frozen = silent = False
        if quiesce:
            try:
                self._hv.freeze(domain, FREEZE_TIMEOUT)
                frozen = True
                timeline.mark("frozen")
            except QuiesceError as exc:
                silent = isinstance(exc, GuestAgentSilentError)
                self._reporter.warning(f"{exc}; the snapshot is crash-consistent")
        try:
            self._begin_backup(image_id, job, plan, read_only, ancestor, directory)
        finally:
            if frozen or quiesce:
                try:
                    self._hv.thaw(domain)  # also after a freeze that timed out half-way
                    timeline.mark("thawed")
                except QuiesceError as exc:
                    if frozen:
                        self._reporter.warning(str(exc))
        return Consistency.QUIESCED if frozen else Consistency.CRASH_CONSISTENT, silent

    def _begin_backup(self, image_id: str, job: SnapshotJob, plan: BackupPlan,
                      read_only: list[str], ancestor: Image | None, directory: Path) -> None:
        incremental = any(d.incremental for d in job.disks)
        in_ram = [d for d in job.disks if self._data_dir.is_qemu_ram_file(Path(d.target))]
        try:
            self._hv.begin_backup(job.domain, plan)
            timeline.mark("backup-begun")
        except CheckpointBrokenError as exc:
            if not incremental:
                raise
            # QEMU stopped without storing the record of what changed, or the bitmap is gone
            # from the disk: copy the whole disk, stored on the server's image, and start the
            # chain again from this snapshot's new checkpoint.
            self._reporter.note(f"{exc}; copying the whole disk")
            snapshot_chain.give_up(self._hv, directory, job.domain)
            full = tuple(self._full_copy(d, ancestor, index) for index, d in enumerate(job.disks))
            self._catalogue.replan_snapshot(image_id, full, ancestor.id if ancestor else None)
            snapshot_targets.make(self._data_dir, self._hv, replace(job, disks=full))
            self._hv.begin_backup(job.domain, _backup_plan(full, read_only))
        except HypervisorError as exc:
            if not in_ram or not _about_a_target_in_ram(str(exc), self._data_dir):
                raise
            # QEMU may not open a file in RAM here (a security profile that keeps it out
            # of /dev/shm, a tmpfs mounted with options it refuses): the same copies in tmp/.
            self._reporter.note(f"{exc}; copying into {self._data_dir.tmp_dir} instead")
            on_disk = tuple(replace(d, target=str(self._data_dir.tmp_dir / Path(d.target).name
                                                  .removeprefix(self._data_dir.ram_prefix)))
                            if d in in_ram else d for d in job.disks)
            for disk in in_ram:
                Path(disk.target).unlink(missing_ok=True)
            self._catalogue.replan_snapshot(image_id, on_disk,
                                            self._catalogue.get(image_id).parent_id)
            snapshot_targets.make(self._data_dir, self._hv, replace(job, disks=on_disk))
            self._hv.begin_backup(job.domain, _backup_plan(on_disk, read_only))
            timeline.mark("backup-begun")

    def _full_copy(self, disk: SnapshotDisk, ancestor: Image | None, index: int) -> SnapshotDisk:
        parent = (str(self._data_dir.image_path(ancestor.path))
                  if index == 0 and ancestor and ancestor.path else None)
        return replace(disk, incremental=False, since=None, ancestor=parent)

    def _new_image_id(self) -> str:
        return ids.allocate("img", lambda candidate: not self._catalogue.exists(candidate))


def _about_a_target_in_ram(message: str, data_dir: DataDir) -> bool:
    """Whether libvirt's refusal of a backup names a target in RAM, or a permission: not a
    lost connection or a busy domain, which the same copies in tmp/ would meet as well."""
    return str(data_dir.qemu_ram_dir) in message or "Permission denied" in message


def _backup_plan(disks: tuple[SnapshotDisk, ...], read_only: list[str]) -> BackupPlan:
    """The backup of the job's disks, and the checkpoint it creates (if any)."""
    since = next((d.since or change_tracking.CHECKPOINT for d in disks if d.incremental), None)
    made = next((NewCheckpoint(d.checkpoint, d.device, "bbsnap snapshot chain (bbsnap deletes it)")
                 for d in disks if d.checkpoint), None)
    # The targets are made by snapshot_targets.make: libvirt reuses them (and hands them back).
    return BackupPlan(targets=tuple(BackupTarget(d.device, Path(d.target)) for d in disks),
                      skipped=tuple(read_only), incremental_from=since, new_checkpoint=made,
                      reuse_targets=True)


def spawn_finisher(launcher: WorkerLauncher, data_dir: DataDir, catalogue: Catalogue,
                   image_id: str, lock: locks.ServerLock) -> None:
    """Hand a snapshot's copy to a detached worker that inherits the server's lock, and
    record the worker as the job's owner (used by crash recovery)."""
    token = _spawn_worker(launcher, data_dir, image_id, lock)
    if token:
        catalogue.update(image_id, job=token)
        locks.record_holder(lock, token, f"copying snapshot {image_id}")  # waiters name it


def _spawn_worker(launcher: WorkerLauncher, data_dir: DataDir, image_id: str,
                  lock: locks.ServerLock, *, agent_silent: bool = False) -> str | None:
    """Start the worker finishing *image_id*, detached, holding the server's lock; its
    job token."""
    pid = launcher.start(image_id, lock, data_dir.logs_dir / f"{image_id}.log",
                         agent_silent=agent_silent)
    return token_for_pid(pid)


def _memory_hook() -> Any:
    """services/snapshots/memory.py, imported only for a memory snapshot: it brings the
    memory file's compression libraries, ~15-20 ms of every other snapshot's imports."""
    from bbsnap.services.snapshots import memory

    return memory
