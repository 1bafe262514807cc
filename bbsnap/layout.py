"""Where bbsnap keeps things inside its data directory, and the permissions they need.

QEMU runs as ``libvirt-qemu``: image files must be readable by it and every
directory on the way must be traversable (o+x), or guests fail to start with a
permission error that names none of this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import BbsnapError, CataloguePathError

DIR_MODE = 0o755
FILE_MODE = 0o644
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def catalogue_path(self) -> Path:
        return self.root / "catalogue.sqlite3"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def tmp_dir(self) -> Path:
        """Work files of running jobs; anything here without a live job is garbage."""
        return self.root / "tmp"

    @property
    def servers_dir(self) -> Path:
        """One directory per bbsnap server: its disk overlay, seed ISO and console log."""
        return self.root / "servers"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    @property
    def logs_dir(self) -> Path:
        """Logs of background workers (one per snapshot)."""
        return self.root / "logs"

    @property
    def blank_overlays_dir(self) -> Path:
        """Empty overlays on catalogue images (with their change-tracking bitmap), made once
        per image and disk size and copied for each new server disk."""
        return self.root / "blank-overlays"

    @property
    def quarantine_dir(self) -> Path:
        """What `doctor --fix` reclaimed, one directory per run (quarantine/<UTC time>/),
        deleted by a later `doctor --fix` after a grace period (services/doctor.py)."""
        return self.root / "quarantine"

    def blank_overlay(self, image_id: str, size: int) -> Path:
        return self.blank_overlays_dir / f"{image_id}-{size}.qcow2"

    def remove_blank_overlays(self, image_id: str) -> None:
        for path in self.blank_overlays_dir.glob(f"{image_id}-*.qcow2"):
            path.unlink(missing_ok=True)

    def export_journal(self, token: str) -> Path:
        """An export's crash journal (it names the partial output), by the export's job token."""
        return self.tmp_dir / f"export.{token}.journal"

    def export_journals(self) -> list[tuple[str, Path]]:
        """Every export crash journal, with the job token of the export that wrote it."""
        return [(path.name[len("export."):-len(".journal")], path)
                for path in self.tmp_dir.glob("export.*.journal")]

    def server_dir(self, server_id: str) -> Path:
        return self.servers_dir / server_id

    def image_file(self, image_id: str, fmt: str = "qcow2") -> Path:
        return self.images_dir / f"{image_id}.{fmt}"

    def image_path(self, stored: str) -> Path:
        """The file a catalogue ``path`` (image or volume) names, inside images/ or refused.

        The catalogue is a file too: a row edited (or restored) to name ``/etc/shadow``,
        ``../x`` or a symlink leading out would make destroy delete and export serve a
        host file. Only a relative name without ``..`` that resolves (symlinks followed)
        strictly inside images/ is accepted; the returned path is images/ joined with it.
        """
        name = PurePosixPath(stored)
        if not stored or name.is_absolute() or ".." in name.parts or "\0" in stored:
            raise CataloguePathError(f"the catalogue names the image file {stored!r}, which "
                                     f"is not a file name inside {self.images_dir}")
        path = self.images_dir / name
        inside, resolved = self.images_dir.resolve(), path.resolve()
        if resolved == inside or not resolved.is_relative_to(inside):
            raise CataloguePathError(f"the catalogue's image file {stored!r} resolves to "
                                     f"{resolved}, not to a file inside {self.images_dir}")
        return path

    def remove_image_files(self, image_id: str) -> None:
        """Every file of an image that never became available: work files in tmp/ and
        anything renamed into images/ (an interrupted job's final file is as untrusted as
        its partial one). Matches ``img-xxxxx.*`` and volumes ``img-xxxxx-vdb.qcow2``."""
        for directory in (self.tmp_dir, self.images_dir):
            for path in directory.glob(f"{image_id}[.-]*"):
                path.unlink(missing_ok=True)

    def ensure(self) -> "DataDir":
        """Create the directories (idempotent) with modes QEMU's user can traverse.

        Parents are left alone: changing a home directory's mode behind the user's
        back is not ours to do.
        """
        try:
            for directory in (self.root, self.images_dir, self.tmp_dir, self.servers_dir,
                              self.locks_dir, self.logs_dir, self.blank_overlays_dir):
                directory.mkdir(parents=True, exist_ok=True)
                os.chmod(directory, DIR_MODE)
        except OSError as exc:
            raise BbsnapError(f"cannot prepare data directory {self.root}: {exc.strerror}",
                              hint="choose another with --data-dir or BBSNAP_HOME") from exc
        return self
