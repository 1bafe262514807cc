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
The copy is a full image of what the guest sees; when the server's disk is an
overlay on a catalogue image, the worker turns it into a delta on that image
(see snapshot_finish). Shut-off servers are copied with qemu-img instead.

Quiescing: the guest agent freezes the filesystems (bounded by the agent
timeout), the backup begins, and the thaw runs in a ``finally``. Without an
answering agent the snapshot is crash-consistent, and the image says so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from .. import ids, locks, proc
from ..catalogue import Catalogue, utcnow
from ..errors import CheckpointBrokenError, ConflictError, QuiesceError
from ..hypervisor import DiskInfo, DomainState, Hypervisor
from ..hypervisor.domain_xml import build_backup_xml, read_disks
from ..jobs import current_job_token, token_for_pid
from ..layout import DataDir
from ..models import (Consistency, Image, ImageStatus, ImageType, Server, SnapshotDisk,
                      SnapshotJob)
from ..text import escape
from . import change_tracking, image_fields
from .server_records import server_from_domain

FREEZE_TIMEOUT = 5  # seconds the agent may take to freeze (or thaw) before we give up on it


@dataclass(frozen=True)
class SnapshotRequest:
    server: str
    name: str | None = None
    quiesce: bool = True


class SnapshotService:
    def __init__(self, catalogue: Catalogue, data_dir: DataDir, hypervisor: Hypervisor,
                 worker_argv: list[str]) -> None:
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._hv = hypervisor
        self._worker_argv = worker_argv  # the command that runs `finish-snapshot IMG`

    def begin(self, request: SnapshotRequest, *,
              on_wait: Callable[[], None] | None = None) -> Image:
        """Register the image as creating, fix the point in time, hand the copy to a worker."""
        info = self._hv.info(request.server)
        lock = locks.acquire(self._data_dir.locks_dir, info.uuid, on_wait=on_wait,
                             timeout=self._data_dir.lock_timeout,
                             purpose=f"snapshot of {info.name}")
        try:
            # Read again under the lock (a waited-for operation may have changed it), once:
            # every libvirt round trip here adds to the command's latency.
            info = self._hv.info(info.name)
            xml = self._hv.domain_xml(info.name)
            server = server_from_domain(self._hv, info, xml=xml)
            all_disks = read_disks(xml)
            disks = [d for d in all_disks if d.writable]
            if not disks:
                raise ConflictError(f"server {server.id} has no writable file-backed disk")
            running = info.state in (DomainState.RUNNING, DomainState.PAUSED)
            image_id = self._new_image_id()
            ancestor = self._ancestor(server)
            ancestor_file = (self._data_dir.image_path(ancestor.path)
                             if ancestor and ancestor.path else None)
            incremental = bool(running and ancestor_file and change_tracking.usable(
                self._data_dir, server.id, disks, ancestor_file))
            if incremental:
                change_tracking.ensure_registered(self._hv, server.id, disks[0].target)
            job = SnapshotJob(
                domain=server.id, domain_uuid=server.uuid, mode="backup" if running else "copy",
                disks=tuple(self._plan_disk(image_id, index, disk, ancestor_file, incremental)
                            for index, disk in enumerate(disks)))
            consistency = Consistency.CRASH_CONSISTENT
            image = self._catalogue.add(
                self._draft(image_id, request, server, ancestor, consistency),
                snapshot_job=job, depends_on=ancestor.id if ancestor else None)
            try:
                if running:
                    read_only = [d.target for d in all_disks if not d.writable]
                    consistency = self._fix_point_in_time(image_id, job, read_only,
                                                          request.quiesce)
                worker = _spawn_worker(self._worker_argv, self._data_dir, image.id, lock)
                # One commit once the copy runs: each fsync now may wait behind its writeback.
                changes: dict[str, Any] = {"consistency": consistency}
                if worker:
                    changes["job"] = worker
                image = self._catalogue.update(image.id, **changes)
            except BaseException as exc:
                self._catalogue.fail_snapshot(image.id, f"could not start the snapshot: {exc}")
                self._data_dir.remove_image_files(image.id)
                raise
            return image
        finally:
            lock.release()  # the worker holds its own copy of the lock until it is done

    def _draft(self, image_id: str, request: SnapshotRequest, server: Server,
               ancestor: Image | None, consistency: Consistency) -> Image:
        arch = ancestor.arch if ancestor else image_fields.host_arch()
        stamp = datetime.now().strftime("%d %b %H:%M")
        name = request.name or f"Snapshot of {server.id} {stamp} ({arch})"
        return Image(
            id=image_id, type=ImageType.SNAPSHOT,
            owner=ancestor.owner if ancestor else (server.owner or "local"),
            created_at=utcnow(), status=ImageStatus.CREATING,
            name=image_fields.check_name(name), arch=arch,
            description=f"Snapshot of server {server.id} ({server.name})",
            ancestor_id=ancestor.id if ancestor else None, source_server=server.id,
            consistency=consistency, firmware=server.firmware,
            username=ancestor.username if ancestor else None,
            min_ram=ancestor.min_ram if ancestor else None, job=current_job_token())

    def _ancestor(self, server: Server) -> Image | None:
        """The catalogue image a bbsnap server was built from, if it is still there."""
        if not server.image_id:
            return None
        try:
            image = self._catalogue.get(server.image_id)
        except Exception:
            return None
        return image if image.status is ImageStatus.AVAILABLE else None

    def _plan_disk(self, image_id: str, index: int, disk: DiskInfo, ancestor_file: Path | None,
                   incremental: bool) -> SnapshotDisk:
        target = self._data_dir.tmp_dir / f"{image_id}.{disk.target}.copy.qcow2"
        primary = index == 0 and ancestor_file is not None
        return SnapshotDisk(device=disk.target, source=disk.path, source_format=disk.format,
                            target=str(target), ancestor=str(ancestor_file) if primary else None,
                            incremental=primary and incremental)

    def _fix_point_in_time(self, image_id: str, job: SnapshotJob, read_only: list[str],
                           quiesce: bool) -> Consistency:
        domain = job.domain
        frozen = False
        if quiesce:
            try:
                self._hv.freeze(domain, FREEZE_TIMEOUT)
                frozen = True
            except QuiesceError as exc:
                print(f"bbsnap: warning: {escape(exc)}; the snapshot is crash-consistent",
                      file=sys.stderr)
        try:
            self._begin_backup(image_id, job, read_only)
        finally:
            if frozen or quiesce:
                try:
                    self._hv.thaw(domain)  # also after a freeze that timed out half-way
                except QuiesceError as exc:
                    if frozen:
                        print(f"bbsnap: warning: {escape(exc)}", file=sys.stderr)
        return Consistency.QUIESCED if frozen else Consistency.CRASH_CONSISTENT

    def _begin_backup(self, image_id: str, job: SnapshotJob, read_only: list[str]) -> None:
        incremental = any(d.incremental for d in job.disks)
        try:
            self._hv.begin_backup(job.domain, _backup_xml(job.disks, read_only))
        except CheckpointBrokenError as exc:
            if not incremental:
                raise
            # QEMU stopped without storing the record of what changed: copy the whole disk.
            print(f"bbsnap: note: {escape(exc)}; copying the whole disk", file=sys.stderr)
            change_tracking.give_up(self._hv, self._data_dir, job.domain)
            full = tuple(replace(d, incremental=False) for d in job.disks)
            self._catalogue.replan_snapshot(image_id, full)
            self._hv.begin_backup(job.domain, _backup_xml(full, read_only))

    def _new_image_id(self) -> str:
        for _ in range(50):
            candidate = ids.new_id("img")
            if not self._catalogue.exists(candidate):
                return candidate
        raise ConflictError("could not allocate a free image id")


def _backup_xml(disks: tuple[SnapshotDisk, ...], read_only: list[str]) -> str:
    incremental = change_tracking.CHECKPOINT if any(d.incremental for d in disks) else None
    return build_backup_xml({d.device: Path(d.target) for d in disks}, read_only, incremental)


def spawn_finisher(worker_argv: list[str], data_dir: DataDir, catalogue: Catalogue,
                   image_id: str, lock: locks.ServerLock) -> None:
    """Hand a snapshot's copy to a detached worker that inherits the server's lock, and
    record the worker as the job's owner (used by crash recovery)."""
    token = _spawn_worker(worker_argv, data_dir, image_id, lock)
    if token:
        catalogue.update(image_id, job=token)
        locks.record_holder(lock, token, f"copying snapshot {image_id}")  # waiters name it


def _spawn_worker(worker_argv: list[str], data_dir: DataDir, image_id: str,
                  lock: locks.ServerLock) -> str | None:
    """Start `finish-snapshot IMG` detached, holding the server's lock; its job token."""
    pid = proc.spawn_detached([*worker_argv, "finish-snapshot", image_id, "--lock-fd",
                               str(lock.fd)], log_path=data_dir.logs_dir / f"{image_id}.log",
                              pass_fds=[lock.fd])
    return token_for_pid(pid)
