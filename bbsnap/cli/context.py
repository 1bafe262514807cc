"""Wiring: build settings and the real ports once per command, lazily.

Nothing heavy is imported until a command needs it, so ``bbsnap --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..catalogue import Catalogue
    from ..config import Settings
    from ..layout import DataDir
    from ..services.image_export import ImageExporter
    from ..services.image_import import ImageImporter
    from ..hypervisor.libvirt_adapter import LibvirtHypervisor
    from ..services.images import ImageService
    from ..services.server_create import ServerCreator
    from ..services.servers import ServerService
    from ..services.snapshot import SnapshotService


@dataclass
class AppContext:
    overrides: dict[str, Any]
    debug: bool = False
    _settings: "Settings | None" = None
    _catalogue: "Catalogue | None" = None
    _data_dir: "DataDir | None" = None
    _hypervisor: "LibvirtHypervisor | None" = None
    _closers: list[Any] = field(default_factory=list)

    @property
    def settings(self) -> "Settings":
        if self._settings is None:
            from ..config import load_settings

            self._settings = load_settings(self.overrides)
        return self._settings

    @property
    def data_dir(self) -> "DataDir":
        if self._data_dir is None:
            from ..layout import DataDir

            self._data_dir = DataDir(self.settings.data_dir).ensure()
        return self._data_dir

    @property
    def catalogue_as_found(self) -> "Catalogue":
        """The catalogue without crash recovery (`doctor` reports what it would do)."""
        if self._catalogue is None:
            from ..catalogue import Catalogue

            self._catalogue = Catalogue(self.data_dir.catalogue_path)
            self._closers.append(self._catalogue.close)
        return self._catalogue

    @property
    def catalogue(self) -> "Catalogue":
        """The catalogue after crash recovery (the first use in a command runs it)."""
        if self._catalogue is None:
            from ..services.recovery import recover_interrupted, recover_interrupted_exports

            catalogue = self.catalogue_as_found
            recover_interrupted(catalogue, self.data_dir, self._adopt_snapshot)
            self._recover_creates()
            recover_interrupted_exports(self.data_dir)
            return catalogue
        return self._catalogue

    def _recover_creates(self) -> None:
        """Clean up after a killed `servers create` (cheap: a glob, usually empty)."""
        if not any(self.data_dir.servers_dir.glob("srv-*/.creating")):
            return
        from ..errors import NotFoundError
        from ..services.recovery import recover_interrupted_creates

        def exists(name: str) -> bool:
            try:
                self.hypervisor.info(name)
                return True
            except NotFoundError:
                return False

        assert self._catalogue is not None
        recover_interrupted_creates(self._catalogue, self.data_dir, exists)

    def recover(self) -> None:
        from ..services.recovery import recover_interrupted

        recover_interrupted(self.catalogue, self.data_dir, self._adopt_snapshot)
        self._recover_creates()

    def worker_argv(self) -> list[str]:
        import sys

        return [sys.executable, "-m", "bbsnap.worker", "--data-dir", str(self.data_dir.root),
                "--connect", self.settings.connect]

    def _adopt_snapshot(self, image_id: str, lock: Any) -> None:
        """Recovery: a new worker finishes (or cleanly fails) an orphaned snapshot."""
        from ..services.snapshot import spawn_finisher

        assert self._catalogue is not None
        spawn_finisher(self.worker_argv(), self.data_dir, self._catalogue, image_id, lock)

    def exporter(self) -> "ImageExporter":
        from ..services.image_export import ImageExporter

        return ImageExporter(self.catalogue, self.data_dir)

    def _forget_checkpoint(self, domain_uuid: str, checkpoint: str) -> None:
        """A destroyed snapshot's checkpoint, removed from its domain (connects only then)."""
        from ..services.snapshot_chain import forget

        forget(self.hypervisor, domain_uuid, checkpoint)

    def snapshots(self) -> "SnapshotService":
        from ..services.snapshot import SnapshotService

        return SnapshotService(self.catalogue, self.data_dir, self.hypervisor, self.worker_argv(),
                               max_chain_depth=self.settings.max_chain_depth)

    def images(self) -> "ImageService":
        from ..services.images import ImageService

        return ImageService(self.catalogue, self.data_dir, self._forget_checkpoint)

    def importer(self) -> "ImageImporter":
        from ..services.image_import import ImageImporter

        return ImageImporter(self.catalogue, self.data_dir, self.settings)

    @property
    def hypervisor(self) -> "LibvirtHypervisor":
        if self._hypervisor is None:
            from ..hypervisor.libvirt_adapter import LibvirtHypervisor

            self._hypervisor = LibvirtHypervisor(self.settings.connect)
            self._closers.append(self._hypervisor.close)
        return self._hypervisor

    def servers(self) -> "ServerService":
        from ..services.servers import ServerService

        return ServerService(self.hypervisor, self.catalogue, self.data_dir)

    def server_creator(self, accel: str | None = None) -> "ServerCreator":
        from ..accel import cached_probe, resolve_accel
        from ..services.server_create import ServerCreator

        setting = accel or self.settings.accel

        def resolve() -> str:
            if setting != "auto":
                return resolve_accel(setting)
            return resolve_accel("auto", cached_probe(self.data_dir.root / "accel-probe.json"))

        return ServerCreator(self.catalogue, self.data_dir, self.hypervisor, self.settings, resolve)

    def close(self) -> None:
        if leave_open_at_exit:
            return  # the process ends right after (cli/main.py): the OS closes everything
        while self._closers:
            self._closers.pop()()


# Set by the `bbsnap` entry point, whose process exits as soon as the command is done. Closing
# the catalogue then only costs time: the last SQLite connection to close checkpoints the WAL
# with two fsyncs, and right after `servers snapshot` those wait behind the QEMU copy's
# writeback on the same filesystem (50-170 ms measured here). Every transaction is already
# committed and synced (synchronous=FULL); the next opener uses the WAL as it is.
leave_open_at_exit = False
