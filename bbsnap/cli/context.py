"""Wiring: build settings and the real ports once per command, lazily.

Nothing heavy is imported until a command needs it, so ``bbsnap --help`` stays fast.
"""

from __future__ import annotations

import os
from dataclasses import field
from typing import TYPE_CHECKING, Any

from bbsnap.lazy_dataclass import dataclass

if TYPE_CHECKING:
    from bbsnap.state.catalogue import Catalogue
    from bbsnap.config import Settings
    from bbsnap.state.layout import DataDir
    from bbsnap.services.image_export import ImageExporter
    from bbsnap.services.image_import import ImageImporter
    from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor
    from bbsnap.services.images import ImageService
    from bbsnap.services.prune import PruneService
    from bbsnap.services.schedule import ScheduleService
    from bbsnap.services.server_create import ServerCreator
    from bbsnap.services.servers import ServerService
    from bbsnap.services.snapshots.start import SnapshotService
    from bbsnap.reporting import Reporter


@dataclass
class AppContext:
    overrides: dict[str, Any]
    debug: bool = False
    # Refuse a data directory recorded for another connection (doctor reports it instead).
    bind_data_dir: bool = True
    _settings: "Settings | None" = None
    _catalogue: "Catalogue | None" = None
    _data_dir: "DataDir | None" = None
    _hypervisor: "LibvirtHypervisor | None" = None
    _closers: list[Any] = field(default_factory=list)
    # How services talk to the user: every service built here gets this one (cli/reporter.py).
    reporter: "Reporter" = field(default_factory=lambda: _terminal_reporter())

    @property
    def settings(self) -> "Settings":
        if self._settings is None:
            from bbsnap.config import load_settings

            self._settings = load_settings(self.overrides)
        return self._settings

    @property
    def data_dir(self) -> "DataDir":
        if self._data_dir is None:
            from bbsnap.state.layout import DataDir

            self._data_dir = DataDir.from_settings(self.settings).ensure()
        return self._data_dir

    @property
    def catalogue_as_found(self) -> "Catalogue":
        """The catalogue without crash recovery (`doctor` reports what it would do)."""
        if self._catalogue is None:
            from bbsnap.state.catalogue import Catalogue

            self._catalogue = Catalogue(self.data_dir.catalogue_path,
                                        images_dir=self.data_dir.images_dir)
            self._closers.append(self._catalogue.close)
        return self._catalogue

    @property
    def catalogue(self) -> "Catalogue":
        """The catalogue after crash recovery (the first use in a command runs it)."""
        if self._catalogue is None:
            catalogue = self.catalogue_as_found
            self.recover()
            return catalogue
        return self._catalogue

    def _recover_creates(self) -> None:
        """Clean up after a killed `servers create` (cheap: a glob, usually empty)."""
        if not any(self.data_dir.servers_dir.glob("srv-*/.creating")):
            return
        from bbsnap.errors import NotFoundError
        from bbsnap.services.recovery import recover_interrupted_creates

        def exists(name: str) -> bool:
            try:
                self.hypervisor.info(name)
                return True
            except NotFoundError:
                return False

        assert self._catalogue is not None
        recover_interrupted_creates(self._catalogue, self.data_dir, exists)

    def _recover_rebuilds(self) -> None:
        """Settle a killed `servers rebuild`/`revert` (cheap: a glob, usually empty; only a
        journal left behind connects to libvirt)."""
        if not self.data_dir.rebuild_journals():
            return
        from bbsnap.services.rebuild_journal import recover_interrupted_rebuilds

        assert self._catalogue is not None
        recover_interrupted_rebuilds(self._catalogue, self.data_dir, self.hypervisor)

    def recover(self) -> None:
        """All crash recovery: stale jobs, killed prunes' merges, killed creates, rebuilds
        and exports (whose journals name the partial output: `doctor --fix` must not take
        them for orphans)."""
        from bbsnap.services.recovery import recover_interrupted

        recover_interrupted(self.catalogue_as_found, self.data_dir, self._adopt_snapshot)
        work_files_left = self._work_files_left()
        if work_files_left:
            from bbsnap.services.prune import recover_interrupted_prunes

            recover_interrupted_prunes(self.catalogue_as_found, self.data_dir)
        self._recover_creates()
        self._recover_rebuilds()
        if work_files_left:
            from bbsnap.services import memory_restore
            from bbsnap.services.recovery import recover_interrupted_exports

            memory_restore.remove_stale(self.data_dir)  # unpacked by a killed memory revert
            recover_interrupted_exports(self.data_dir)

    def _work_files_left(self) -> bool:
        """Whether tmp/ holds anything: killed prunes, memory reverts and exports leave their
        journals and files only there, and it is usually empty, so a command skips importing
        their modules (~50 ms of a 10k-row `images list`)."""
        try:
            with os.scandir(self.data_dir.tmp_dir) as entries:
                return any(True for _ in entries)
        except FileNotFoundError:
            return False

    def worker_argv(self) -> list[str]:
        from bbsnap.services.snapshots.worker import base_argv

        return base_argv(str(self.data_dir.root), self.settings.connect)

    def _adopt_snapshot(self, image_id: str, lock: Any) -> None:
        """Recovery: a new worker finishes (or cleanly fails) an orphaned snapshot: a new
        interpreter, not a fork of this command, whose connections are its own."""
        from bbsnap.services.snapshots.start import spawn_finisher
        from bbsnap.services.snapshots.worker import ExecWorker

        assert self._catalogue is not None
        spawn_finisher(ExecWorker(self.worker_argv()), self.data_dir, self._catalogue,
                       image_id, lock)

    def exporter(self) -> "ImageExporter":
        from bbsnap.services.image_export import ImageExporter

        return ImageExporter(self.catalogue, self.data_dir, reporter=self.reporter)

    def _forget_checkpoint(self, domain_uuid: str, checkpoint: str) -> None:
        """A destroyed snapshot's checkpoint, removed from its domain (connects only then)."""
        from bbsnap.services.snapshots.chain import forget

        forget(self.hypervisor, domain_uuid, checkpoint)

    def snapshots(self) -> "SnapshotService":
        from bbsnap.services.snapshots.start import SnapshotService

        from bbsnap.services.snapshots.worker import ForkedWorker

        worker = ForkedWorker(str(self.data_dir.root), self.settings.connect)
        return SnapshotService(self.catalogue, self.data_dir, self.hypervisor, worker,
                               max_chain_depth=self.settings.max_chain_depth,
                               reporter=self.reporter)

    def images(self) -> "ImageService":
        from bbsnap.services.images import ImageService

        return ImageService(self.catalogue, self.data_dir, self._forget_checkpoint)

    def pruner(self) -> "PruneService":
        from bbsnap.services.prune import PruneService

        return PruneService(self.catalogue, self.data_dir, self.hypervisor, self.images(),
                            reporter=self.reporter)

    def scheduler(self) -> "ScheduleService":
        from bbsnap.services.schedule import ScheduleService
        from bbsnap.services.snapshots.start import SnapshotRequest

        def snapshot(server: str, quiesce: bool) -> Any:
            return self.snapshots().begin(SnapshotRequest(server=server, quiesce=quiesce))

        return ScheduleService(self.catalogue, self.data_dir, self.hypervisor,
                               snapshot=snapshot,
                               prune=lambda server, policy: self.pruner().prune(server, policy),
                               recover=self.recover)

    def importer(self) -> "ImageImporter":
        from bbsnap.services.image_import import ImageImporter

        return ImageImporter(self.catalogue, self.data_dir, self.settings, reporter=self.reporter)

    @property
    def hypervisor(self) -> "LibvirtHypervisor":
        if self._hypervisor is None:
            from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor

            hypervisor = LibvirtHypervisor(self.settings.connect)
            if self.bind_data_dir:
                self._bind_data_dir(hypervisor)
            self._hypervisor = hypervisor
            self._closers.append(self._hypervisor.close)
        return self._hypervisor

    def _bind_data_dir(self, hypervisor: "LibvirtHypervisor") -> None:
        """A data directory belongs to one connection (host_access.py): refuse another
        before connecting; the first one that answers is recorded when the command ends."""
        from bbsnap import host_access

        host_access.refuse_other_connection(self.data_dir.root, self.settings.connect)

    def _record_connection(self) -> None:
        """The connection answered (a connection that failed claims nothing)."""
        if not (self.bind_data_dir and self._hypervisor is not None
                and self._hypervisor.connected):
            return
        from bbsnap import host_access

        try:
            host_access.record_connection(self.data_dir.root, self.settings.connect)
        except OSError:
            pass  # a read-only data directory: the next command that can write records it

    def keep_image_access(self) -> None:
        """Before a command starts guests: a normal user on qemu:///system keeps reading the
        images libvirt is about to hand to QEMU's user (host_access.keep_my_access)."""
        from bbsnap import host_access

        host_access.keep_my_access(sorted(self.data_dir.images_dir.glob("*.qcow2")),
                                   self.settings.connect)

    def check_qemu_access(self) -> None:
        """Before a command makes files QEMU must open: can QEMU's user reach them?"""
        from bbsnap import host_access

        host_access.require_reachable(self.data_dir.root, self.settings.connect,
                                      self.settings.qemu_user)

    def servers(self) -> "ServerService":
        from bbsnap.services.servers import ServerService

        return ServerService(self.hypervisor, self.catalogue, self.data_dir, self.reporter,
                             connect=self.settings.connect)

    def server_creator(self, accel: str | None = None) -> "ServerCreator":
        from bbsnap.accel import cached_probe, resolve_accel
        from bbsnap.services.server_create import ServerCreator

        setting = accel or self.settings.accel

        def resolve() -> str:
            if setting != "auto":
                return resolve_accel(setting)
            return resolve_accel("auto", cached_probe(self.data_dir.root / "accel-probe.json"))

        return ServerCreator(self.catalogue, self.data_dir, self.hypervisor, self.settings, resolve,
                             reporter=self.reporter)

    def close(self) -> None:
        self._record_connection()
        if leave_open_at_exit:
            _left_open.append(self)  # the process ends right after (cli/main.py)
            return
        while self._closers:
            self._closers.pop()()

    def settle_catalogue(self) -> None:
        """Make what this command committed durable in the catalogue's main file alone.

        Raises CatalogueError when it is not: the WAL or the main file was replaced under
        this command, or the main file lacks a row this command wrote after a checkpoint.
        """
        import sqlite3

        from bbsnap.errors import CatalogueError

        catalogue = self._catalogue
        if catalogue is None or not catalogue.committed:
            return  # nothing of ours to make durable: a read-only command costs nothing more
        try:
            lost = _not_durable(catalogue)
        except sqlite3.Error as exc:
            raise CatalogueError(f"cannot checkpoint the image catalogue {catalogue.path}: "
                                 f"{exc}", hint="run 'bbsnap doctor'") from exc
        if lost:
            raise CatalogueError(
                f"the image catalogue {catalogue.path} or its WAL was removed or replaced "
                f"while this command ran: what it recorded ({', '.join(lost)}) may be lost",
                hint="run 'bbsnap doctor'; restore catalogue.sqlite3 from a backup if rows "
                     "are missing")


def _not_durable(catalogue: "Catalogue") -> list[str]:
    """Checkpoint (or leave it to a live worker) and say which written rows it cannot vouch for."""
    if catalogue.files_replaced():
        # Another history now builds on the path (a restored file, a WAL another process
        # started after ours was deleted): writing our frames into it would corrupt it.
        return catalogue.touched or ["its changes"]
    if _another_job_commits_later(catalogue):
        return []  # its last commit comes after ours, and its checkpoint then covers ours
    if catalogue.checkpoint():
        # Even a deleted WAL is still open here: the checkpoint copied it into the main
        # file, and the rows we wrote are looked up there to prove it.
        return catalogue.missing_from_main_file()
    return []  # other writers outlasted the wait: each checkpoints after its last commit


def _another_job_commits_later(catalogue: "Catalogue") -> bool:
    """Whether this command handed an image it wrote to another live process (the worker
    of `servers snapshot`), which still has it `creating`.

    Asked after this command's last commit: that process's final commit, and the checkpoint
    the worker makes after it, come later and copy our frames too. `servers snapshot` so
    returns without the checkpoint's fsyncs, which wait behind the QEMU copy's writeback
    (50-170 ms measured here). If the worker dies instead, the next command recovers its
    image: a commit, and a checkpoint. Only images this command wrote count: an unrelated
    long copy must not leave an import's row in the WAL for its duration.
    """
    from bbsnap.state.process_tokens import current_job_token, job_alive

    ours, touched = current_job_token(), set(catalogue.touched)
    return any(i.id in touched and i.job != ours and job_alive(i.job)
               for i in catalogue.creating())


def settle_at_exit() -> None:
    """The `bbsnap` process is about to end: checkpoint what its commands committed."""
    while _left_open:
        _left_open.pop().settle_catalogue()


# Set by the `bbsnap` entry point, whose process exits as soon as the command is done:
# closing connections would only cost time. What a command committed is checkpointed by
# settle_at_exit() after its output is flushed, so the catalogue's main file alone holds
# every committed row (a backup of catalogue.sqlite3 alone is a whole catalogue).
leave_open_at_exit = False
_left_open: list[AppContext] = []


def _terminal_reporter() -> "Reporter":
    from bbsnap.cli.reporter import TerminalReporter

    return TerminalReporter()
