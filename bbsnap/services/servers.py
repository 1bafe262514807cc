"""Server lifecycle: list, show, start, stop, reboot, destroy, console, ssh.

Any libvirt domain on the connection is a server here (named by its name or
UUID); only bbsnap's own are destroyed with their files.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bbsnap import ids
from bbsnap.state import locks
from bbsnap.state.catalogue import Catalogue
from bbsnap.disks import qemu_img
from bbsnap.errors import ConflictError, NotFoundError
from bbsnap.hypervisor import DomainState, Hypervisor
from bbsnap.state.process_tokens import current_job_token
from bbsnap.state.layout import DataDir
from bbsnap.reporting import SILENT, Reporter
from bbsnap.models import (DependentKind, Image, ImageFilter, ImageType, Server,
                           ServerStatus)
from bbsnap.services import memory_restore, rebuild_journal, revert
from bbsnap.services.snapshots import change_tracking
from bbsnap.services.compensation import Compensation
from bbsnap.services.server_records import server_from_domain

DEFAULT_STOP_TIMEOUT = 60.0


class ServerService:
    def __init__(self, hypervisor: Hypervisor, catalogue: Catalogue, data_dir: DataDir,
                 reporter: Reporter = SILENT) -> None:
        self._hv = hypervisor
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._reporter = reporter

    def find(self) -> list[Server]:
        servers = [server_from_domain(self._hv, info, with_addresses=False)
                   for info in self._hv.list_domains()]
        return sorted(servers, key=lambda s: (not s.managed, s.created_at is None,
                                              s.created_at.isoformat() if s.created_at else "",
                                              s.id))

    def get(self, key: str, *, with_addresses: bool = True) -> Server:
        return server_from_domain(self._hv, self._hv.info(key), with_addresses=with_addresses)

    def _lock(self, server: Server, purpose: str) -> locks.ServerLock:
        """Serialise with other bbsnap operations on the server (a snapshot copy holds it)."""
        return locks.acquire(self._data_dir.locks_dir, server.uuid,
                             timeout=self._data_dir.lock_timeout,
                             purpose=f"servers {purpose} {server.id}",
                             on_wait=lambda: self._reporter.waiting(
                                 f"another operation on {server.id}"))

    def start(self, key: str) -> Server:
        server = self.get(key, with_addresses=False)
        with self._lock(server, "start"):
            if self._hv.info(server.id).state is DomainState.RUNNING:
                raise ConflictError(f"server {server.id} is already running")
            self._hv.start(server.id)
        return self.get(server.id, with_addresses=False)

    def stop(self, key: str, *, force: bool = False,
             timeout: float = DEFAULT_STOP_TIMEOUT) -> Server:
        """ACPI shutdown, waiting up to *timeout*; ``force`` pulls the plug at once."""
        server = self.get(key, with_addresses=False)
        if server.status is ServerStatus.INACTIVE:
            raise ConflictError(f"server {server.id} is not running")
        with self._lock(server, "stop"):
            if force:
                self._hv.destroy(server.id)
            else:
                self._hv.shutdown(server.id)
                if not _wait_for_state(self._hv, server.id, DomainState.SHUTOFF, timeout):
                    raise ConflictError(
                        f"server {server.id} did not shut down within {timeout:g} s",
                        hint="the guest may ignore ACPI; use --force to power it off")
        return self.get(server.id, with_addresses=False)

    def reboot(self, key: str) -> Server:
        server = self.get(key, with_addresses=False)
        if server.status is not ServerStatus.ACTIVE:
            raise ConflictError(f"server {server.id} is not running")
        self._hv.reboot(server.id)
        return server

    def destroy(self, key: str) -> Server:
        """Power off, undefine, drop the image dependency, delete the server's files."""
        server = self.get(key, with_addresses=False)
        if not server.managed:
            raise ConflictError(
                f"{server.id} was not created by bbsnap; bbsnap does not delete its disks",
                hint=f"use 'virsh undefine {server.id}' if you mean it")
        with self._lock(server, "destroy") as lock:
            if self._hv.info(server.id).state is not DomainState.SHUTOFF:
                self._hv.destroy(server.id)
            self._hv.undefine(server.id)
            if server.image_id:
                self._catalogue.remove_dependent(DependentKind.SERVER, server.id, server.image_id)
            directory = self._data_dir.server_dir(server.id)
            if directory.exists():
                shutil.rmtree(directory)
            locks.remove_held(lock)  # while held: a waiter re-checks the path once it gets it
        return server

    def snapshots(self, server: Server) -> list[Image]:
        """The server's history: its snapshot images not deleted, oldest first."""
        return self._catalogue.find(ImageFilter(type=ImageType.SNAPSHOT,
                                                source_server=server.id))

    def rebuild(self, key: str, image_id: str) -> Server:
        """Give a bbsnap server a fresh overlay on *image_id*, keeping its id, name, MAC and
        seed. Writes since are discarded."""
        server = self.get(key, with_addresses=False)
        if not server.managed:
            raise ConflictError(f"{server.id} was not created by bbsnap; bbsnap cannot rebuild it")
        return self._rebuild(server, self._catalogue.get_available(ids.require(image_id, "img")),
                             "rebuild")

    def revert(self, key: str, image_id: str | None = None, *, disk_only: bool = False) -> Server:
        """Rebuild the server onto one of its own snapshots (by default its newest available
        one): what the guest wrote since that snapshot is discarded, nothing else. A memory
        snapshot's guest resumes from its instant unless *disk_only* (memory_restore.py)."""
        server = self.get(key, with_addresses=False)
        writable = [d for d in self._hv.disks(server.id) if d.writable]
        wanted = ids.require(image_id, "img") if image_id is not None else None
        image = revert.choose_snapshot(server, self.snapshots(server), wanted,
                                       self._catalogue.get)
        revert.check_revertible(server, len(writable), len(self._catalogue.volumes(image.id)))
        if image.memory_state and not disk_only:
            with memory_restore.prepared(self._hv, self._data_dir, server, image) as boot:
                return self._rebuild(server, image, "revert", boot=boot)
        return self._rebuild(server, image, "revert")

    def _rebuild(self, server: Server, image: Image, purpose: str,
                 boot: memory_restore.Boot | None = None) -> Server:
        """Onto *image*, which the caller found available; *boot* resumes a saved guest on
        the new disk instead of starting it afresh (memory_restore.py)."""
        if image.firmware != server.firmware:
            # The server keeps its definition, so its firmware: the new disk would not boot.
            raise ConflictError(
                f"image {image.id} boots with {image.firmware} and server {server.id} with "
                f"{server.firmware}", hint="create a new server from the image instead")
        with self._lock(server, purpose):
            # Read again under the lock: a rebuild waited for may have changed its disk.
            journal = self._swap_disk(self.get(server.id, with_addresses=False), image, boot)
        # The definition names the new overlay now: the old disk and hold can go.
        if journal.old_image_id and journal.old_image_id != image.id:
            self._catalogue.remove_dependent(DependentKind.SERVER, server.id,
                                             journal.old_image_id)
        old_disk = Path(journal.old_disk)
        if old_disk.parent == self._data_dir.server_dir(server.id):
            old_disk.unlink(missing_ok=True)
        rebuild_journal.remove(self._data_dir, server.id)
        return self.get(server.id, with_addresses=False)

    def _swap_disk(self, server: Server, image: Image,
                   boot: memory_restore.Boot | None = None) -> rebuild_journal.RebuildJournal:
        """Under the server's lock: the new overlay made, the definition pointed at it, the
        server started again if it ran (or *boot* run: a memory image restored onto it).
        Undone on an error; journaled against a SIGKILL."""
        server_dir = self._data_dir.server_dir(server.id)
        was_running = self._hv.info(server.id).state is not DomainState.SHUTOFF
        primary = next(d for d in self._hv.disks(server.id) if d.writable)
        size = max(qemu_img.info(Path(primary.path), primary.format,
                                 force_share=True).virtual_size, image.virtual_size)
        new_disk = server_dir / f"disk-{image.id}-{time.time_ns()}.qcow2"
        journal = rebuild_journal.RebuildJournal(
            token=current_job_token(), server_id=server.id, uuid=server.uuid,
            device=primary.target, old_disk=primary.path, new_disk=str(new_disk),
            old_image_id=server.image_id, new_image_id=image.id,
            was_running=was_running or boot is not None,  # a restored guest ends running
            old_marker=rebuild_journal.read_marker(server_dir))
        with Compensation(self._reporter) as undo:
            rebuild_journal.write(self._data_dir, journal)
            undo.push("the rebuild journal",
                      lambda: rebuild_journal.remove(self._data_dir, server.id))
            undo.push("the new overlay", lambda: new_disk.unlink(missing_ok=True))
            undo.push("the tracking marker", lambda: rebuild_journal.restore_marker(
                server_dir, journal.old_marker))
            change_tracking.new_tracked_overlay(
                self._data_dir, image.id, self._data_dir.image_path(str(image.path)), size,
                new_disk)
            if was_running:
                self._hv.destroy(server.id)  # its disk is being thrown away: no need to be gentle
                undo.push(f"restarting {server.id}", lambda: self._hv.start(server.id))
            old = self._hv.facts(server.id, inactive=True)
            old_disk = next(d for d in old.file_disks if d.target == primary.target)
            if image.id != server.image_id:
                self._catalogue.add_dependent(image.id, DependentKind.SERVER, server.id)
                undo.push("the image dependency", lambda: self._catalogue.remove_dependent(
                    DependentKind.SERVER, server.id, image.id))
            self._hv.replace_disk(server.id, primary.target, new_disk,
                                  metadata={**old.metadata, "image_id": image.id})
            undo.push(f"the old definition of {server.id}", lambda: self._hv.replace_disk(
                server.id, old_disk.target, Path(old_disk.path), old_disk.format,
                metadata=old.metadata))
            if boot is not None:
                boot(new_disk, primary.target)
            elif was_running:
                self._hv.start(server.id)
        return journal

    def console_log(self, key: str) -> Path:
        server = self.get(key, with_addresses=False)
        path = self._hv.facts(server.id).console_log
        if path is None:
            raise NotFoundError(f"server {server.id} has no serial console log",
                                hint=f"use 'virsh console {server.id}'")
        return path


def _wait_for_state(hv: Hypervisor, name: str, state: DomainState, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if hv.info(name).state is state:
            return True
        time.sleep(0.25)
    return hv.info(name).state is state
