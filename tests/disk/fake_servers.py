"""Servers and snapshots on the fake hypervisor with real qcow2 files, as the service-level
disk tests build them (test_server_flows_fake.py, test_zero_mapped_target.py): a catalogue
holding two base images, a ServerCreator, and a SnapshotService whose worker exits at once
(the copy is the test's to finish, with the fake's complete_job and a SnapshotFinisher)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bbsnap.config import Settings
from bbsnap.models import Image, ImageStatus, ImageType
from bbsnap.netports import PortRegistry
from bbsnap.reporting import SilentReporter
from bbsnap.services.server_create import CreateRequest, ServerCreator
from bbsnap.services.snapshots.start import SnapshotService
from bbsnap.services.snapshots.worker import ExecWorker
from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.state.layout import DataDir
from tests.fakes.hypervisor import FakeHypervisor

MIB = 1 << 20
URI = "test:///fake"
BASE_IMAGES = ("img-base0", "img-next0")  # 64 MiB blank uploads, login user debian


def base_catalogue(data: DataDir) -> Catalogue:
    """*data*'s catalogue, holding BASE_IMAGES (the caller closes it)."""
    cat = Catalogue(data.catalogue_path)
    for image_id in BASE_IMAGES:
        path = data.images_dir / f"{image_id}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(64 * MIB)],
                       check=True)
        cat.add(Image(id=image_id, type=ImageType.UPLOAD, owner="me", created_at=utcnow(),
                      status=ImageStatus.AVAILABLE, name=image_id, path=path.name,
                      virtual_size=64 * MIB, username="debian"))
    return cat


def server_creator(data: DataDir, catalogue: Catalogue, hv: FakeHypervisor, work_dir: Path,
                   ) -> tuple[ServerCreator, PortRegistry]:
    registry = PortRegistry(work_dir / "registry", URI)
    settings = Settings(data_dir=data.root, connect=URI, ssh_ports="41000-41999")
    return ServerCreator(catalogue, data, hv, settings, lambda: "tcg",
                         port_registry=registry), registry


def create_request(work_dir: Path, **changes: object) -> CreateRequest:
    """A server named web on img-base0, 128 MiB, with one SSH key (*changes* on top)."""
    key = work_dir / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG me@host\n")
    return CreateRequest(**{"image_id": "img-base0", "name": "web", "memory_mib": 128,  # type: ignore[arg-type]
                            "ssh_key_files": (key,), **changes})


class Notes(SilentReporter):
    """What the service tells the user, as "note: ..." / "warning: ..." lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, text: str) -> None:
        self.lines.append(f"note: {text}")

    def warning(self, text: str) -> None:
        self.lines.append(f"warning: {text}")


def snapshot_service(data: DataDir, catalogue: Catalogue, hv: FakeHypervisor,
                     notes: Notes | None = None) -> SnapshotService:
    # The worker is `true`: it exits at once, the copy is the test's to finish or not.
    return SnapshotService(catalogue, data, hv, ExecWorker(["true"]), reporter=notes or Notes())
