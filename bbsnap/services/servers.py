"""Server lifecycle: list, show, start, stop, reboot, destroy, console, ssh.

Any libvirt domain on the connection is a server here (named by its name or
UUID); only bbsnap's own are destroyed with their files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from bbsnap import ids
from bbsnap.state import locks
from bbsnap.state.catalogue import Catalogue
from bbsnap.disks import qemu_img
from bbsnap.errors import ConflictError, NotFoundError
from bbsnap.hypervisor import DiskReplacement, DomainState, Hypervisor
from bbsnap.state.process_tokens import current_job_token
from bbsnap.state.layout import DataDir
from bbsnap.reporting import SILENT, Reporter
from bbsnap.models import (DependentKind, Image, ImageFilter, ImageType, Server,
                           ServerStatus)
from bbsnap.services import rebuild_journal, revert, server_disks
from bbsnap.services.snapshots import change_tracking
from bbsnap.services.snapshots.timeline import Timeline, process_start
from bbsnap.services.compensation import Compensation
from bbsnap.services.revert import DiskSource
from bbsnap.services.server_origin import read_origin, write_origin
from bbsnap.services.server_records import server_from_domain

if TYPE_CHECKING:
    from bbsnap.services.memory_restore import MemoryBoot

DEFAULT_STOP_TIMEOUT = 60.0


class ServerService:
    def __init__(self, hypervisor: Hypervisor, catalogue: Catalogue, data_dir: DataDir,
                 reporter: Reporter = SILENT, *, connect: str = "") -> None:
        self._hv = hypervisor
        self._connect = connect  # recorded with a foreign domain's directory (origin.json)
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._reporter = reporter
        # When each step of a revert ended (a memory revert writes it into logs/, for
        # scripts/bench_memory.py); the first mark is this process's start.
        self.timeline = Timeline()
        started = process_start()
        if started is not None:
            self.timeline.mark("started", started)

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
                _remove_tree(directory)
            locks.remove_held(lock)  # while held: a waiter re-checks the path once it gets it
        return server

    def snapshots(self, server: Server) -> list[Image]:
        """The server's history: its snapshot images not deleted, oldest first."""
        return self._catalogue.find(ImageFilter(type=ImageType.SNAPSHOT,
                                                source_server=server.id))

    def rebuild(self, key: str, image_id: str) -> Server:
        """Give a bbsnap server fresh overlays on *image_id*, keeping its id, name, MAC and
        seed. Writes since are discarded; disks the image has no file for are kept."""
        server = self.get(key, with_addresses=False)
        if not server.managed:
            raise ConflictError(f"{server.id} was not created by bbsnap; bbsnap cannot rebuild it",
                                hint=f"'bbsnap servers revert {server.id}' takes it back to one "
                                     "of its own snapshots")
        return self._rebuild(server, self._catalogue.get_available(ids.require(image_id, "img")),
                             "rebuild", every_disk=False)

    def revert(self, key: str, image_id: str | None = None, *, disk_only: bool = False) -> Server:
        """Rebuild the server onto one of its own snapshots (by default its newest available
        one), every disk at once: what the guest wrote since that snapshot is discarded,
        nothing else. Any domain: one bbsnap did not create gets its new disks in a
        directory of its own, and keeps the disk it came with (server_disks.py). A memory
        snapshot's guest resumes from its instant unless *disk_only* (memory_restore.py)."""
        self.timeline.mark("revert")
        server = self.get(key, with_addresses=False)
        wanted = ids.require(image_id, "img") if image_id is not None else None
        image = revert.choose_snapshot(server, self.snapshots(server), wanted,
                                       self._catalogue.get)
        if image.memory_state and not disk_only:
            from bbsnap.services import memory_restore  # only a memory revert needs it

            with memory_restore.prepared(self._hv, self._data_dir, server, image,
                                         self.timeline) as boot:
                reverted = self._rebuild(server, image, "revert", every_disk=True, boot=boot)
            self.timeline.mark("done")
            self.timeline.duration("streamed", 1.0 if boot.streamed else 0.0)  # else unpacked
            memory_restore.write_timeline(self._data_dir, server, self.timeline)
            return reverted
        return self._rebuild(server, image, "revert", every_disk=True)

    def _rebuild(self, server: Server, image: Image, purpose: str, *, every_disk: bool,
                 boot: MemoryBoot | None = None) -> Server:
        """Onto *image*, which the caller found available; *boot* resumes a saved guest on
        the new disks instead of starting it afresh (memory_restore.py)."""
        if image.firmware != server.firmware:
            # The server keeps its definition, so its firmware: the new disk would not boot.
            raise ConflictError(
                f"image {image.id} boots with {image.firmware} and server {server.id} with "
                f"{server.firmware}", hint="create a new server from the image instead")
        with self._lock(server, purpose):
            # Read again under the lock: a rebuild waited for may have changed its disks.
            server = self.get(server.id, with_addresses=False)
            self.timeline.mark("locked")
            directory = server_disks.directory(self._data_dir, server)
            journal = self._swap_disks(server, directory, image, every_disk, boot)
        # The definition names the new overlays now: the old disks and hold can go.
        if journal.old_image_id and journal.old_image_id != image.id:
            self._catalogue.remove_dependent(DependentKind.SERVER, server.id,
                                             journal.old_image_id)
        for swap in journal.swaps:
            old_disk = Path(swap.old_disk)
            if old_disk.parent == directory:
                old_disk.unlink(missing_ok=True)
            else:  # the disk a domain bbsnap did not create came with: the user's
                self._reporter.note(f"{server.id}'s previous disk {swap.device} is kept at "
                                    f"{old_disk}; bbsnap does not delete it")
        rebuild_journal.remove(directory)
        return self.get(server.id, with_addresses=False)

    def _swap_disks(self, server: Server, directory: Path, image: Image, every_disk: bool,
                    boot: MemoryBoot | None) -> rebuild_journal.RebuildJournal:
        """Under the server's lock: the new overlays made, the definition pointed at them,
        the server started again if it ran (or *boot* run: a memory image restored onto
        them). Undone on an error; journaled against a SIGKILL."""
        was_running = self._hv.info(server.id).state is not DomainState.SHUTOFF
        writable = [d for d in self._hv.disks(server.id) if d.writable]
        sources = revert.match_disks(server, writable, image,
                                     self._catalogue.volumes(image.id), every_disk=every_disk)
        stamp = time.time_ns()
        swaps = tuple(rebuild_journal.DiskSwap(
            source.disk.target, source.disk.path,
            str(directory / _overlay_name(image.id, stamp, index, source.disk.target)))
            for index, source in enumerate(sources))
        old_image_id = server_disks.base_image_id(self._data_dir, server, writable[0])
        with Compensation(self._reporter) as undo:
            if not directory.exists():  # a foreign domain's first revert
                self._data_dir.make_dir(directory)  # QEMU's user may enter it, nobody else
                undo.push(f"the directory {directory}", lambda: _remove_tree(directory))
            if not server.managed and read_origin(directory) is None:  # a killed first revert's too
                write_origin(directory, self._connect, server.uuid)
            journal = rebuild_journal.RebuildJournal(
                token=current_job_token(), server_id=server.id, uuid=server.uuid, swaps=swaps,
                old_image_id=old_image_id, new_image_id=image.id,
                was_running=was_running or boot is not None,  # a restored guest ends running
                old_marker=rebuild_journal.read_marker(directory))
            rebuild_journal.write(directory, journal)
            self.timeline.mark("journaled")
            undo.push("the rebuild journal", lambda: rebuild_journal.remove(directory))
            undo.push("the new overlays", lambda: _remove([Path(s.new_disk) for s in swaps]))
            undo.push("the tracking marker", lambda: rebuild_journal.restore_marker(
                directory, journal.old_marker))
            self._make_overlays(server.id, sources, swaps, image)
            self.timeline.mark("overlays")
            if boot is not None:
                boot.ready()  # the memory file checked whole before the guest is stopped
            if was_running:
                # A memory revert replaces the guest's whole state (disks, RAM, NVRAM): unless
                # a disk is the user's own, kept, QEMU need not close anything in order.
                self._hv.destroy(server.id, discarding=boot is not None and all(
                    Path(swap.old_disk).parent == directory for swap in swaps))
                undo.push(f"restarting {server.id}", lambda: self._hv.start(server.id))
            self.timeline.mark("destroyed")
            old = self._hv.facts(server.id, inactive=True)
            formats = {d.target: d.format for d in old.file_disks}
            if image.id != old_image_id:
                self._catalogue.add_dependent(image.id, DependentKind.SERVER, server.id)
                undo.push("the image dependency", lambda: self._catalogue.remove_dependent(
                    DependentKind.SERVER, server.id, image.id))
            # A domain bbsnap did not create gets no bbsnap metadata: it stays the user's.
            metadata = {**old.metadata, "image_id": image.id} if server.managed else None
            self._hv.replace_disks(server.id, [DiskReplacement(s.device, Path(s.new_disk))
                                               for s in swaps], metadata=metadata)
            undo.push(f"the old definition of {server.id}", lambda: self._hv.replace_disks(
                server.id, [DiskReplacement(s.device, Path(s.old_disk),
                                            formats.get(s.device, "qcow2")) for s in swaps],
                metadata=old.metadata if server.managed else None))
            self.timeline.mark("defined")
            if boot is not None:
                boot({s.device: Path(s.new_disk) for s in swaps})
            elif was_running:
                self._hv.start(server.id)
        return journal

    def _make_overlays(self, server_id: str, sources: list[DiskSource],
                       swaps: tuple[rebuild_journal.DiskSwap, ...], image: Image) -> None:
        """The first disk's overlay records every write from its birth (its snapshots copy
        only what changed); further disks' are plain overlays (multi-disk snapshots copy
        every disk whole). Each is at least as large as the disk it replaces, whose size
        libvirt reports: a running disk belongs to QEMU's user under qemu:///system, which a
        normal user's qemu-img cannot open."""
        for index, (source, swap) in enumerate(zip(sources, swaps, strict=True)):
            size = max(self._hv.disk_capacity(server_id, source.disk.target),
                       source.virtual_size)
            stored = self._data_dir.image_path(source.stored)
            if index == 0:
                change_tracking.new_tracked_overlay(self._data_dir, image.id, stored, size,
                                                    Path(swap.new_disk))
            else:
                qemu_img.create_overlay(Path(swap.new_disk), stored, size=size)

    def console_log(self, key: str) -> Path:
        server = self.get(key, with_addresses=False)
        path = self._hv.facts(server.id).console_log
        if path is None:
            raise NotFoundError(f"server {server.id} has no serial console log",
                                hint=f"use 'virsh console {server.id}'")
        return path


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _overlay_name(image_id: str, stamp: int, index: int, device: str) -> str:
    """disk-IMG-TIME.qcow2 for the first disk; further disks' name their device too."""
    return (f"disk-{image_id}-{stamp}.qcow2" if index == 0
            else f"disk-{image_id}-{stamp}-{device}.qcow2")


def _wait_for_state(hv: Hypervisor, name: str, state: DomainState, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if hv.info(name).state is state:
            return True
        time.sleep(0.25)
    return hv.info(name).state is state


def _remove_tree(directory: Path) -> None:
    import shutil  # here: it imports bz2 and lzma, ~3 ms of every server command otherwise

    shutil.rmtree(directory)
