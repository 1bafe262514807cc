"""A server's snapshot chain built by hand with real qemu-img files, for the prune tests.

Files are stored as bbsnap stores them (images/, backing files named relative to it, rows
with parent_id and the image holds). Run as a module, it prunes in a child process that a
test may SIGKILL: ``python -m tests.disk.prune_chain DATA SERVER KEEP_LAST [--die-at-commit]``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bbsnap.state.catalogue import Catalogue
from bbsnap.hypervisor import DomainSpec
from bbsnap.state.layout import DataDir
from bbsnap.models import DependentKind, Image, ImageStatus, ImageType
from bbsnap.services.images import ImageService
from bbsnap.services.prune import PruneReport, PruneService
from bbsnap.services.retention import Policy
from tests.fakes.hypervisor import FakeHypervisor

MIB = 1 << 20
SIZE = 64 * MIB
SERVER = "srv-prune"
START = datetime(2026, 11, 1, 8, 0, tzinfo=timezone.utc)


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@dataclass
class Chain:
    data: DataDir
    base: str              # the server's image (an upload)
    snapshots: list[str]   # oldest first

    def file(self, image_id: str) -> Path:
        return self.data.images_dir / f"{image_id}.qcow2"

    def catalogue(self) -> Catalogue:
        return Catalogue(self.data.catalogue_path)


# What each snapshot writes on top of the previous one (qemu-io commands): overlapping
# ranges, a zeroed range over the base's data, data only an older layer holds.
WRITES = (
    ("write -P 0x11 0 8M", "write -P 0x12 16M 4M"),
    ("write -P 0x21 4M 8M", "write -z 1M 2M"),
    ("write -P 0x31 6M 1M", "write -P 0x32 30M 2M"),
    ("write -P 0x41 20M 1M",),
)


def build(root: Path, *, standalone_first: bool = False, scale: int = 1) -> Chain:
    """The base image and four snapshots, each stored on the previous one (the first on the
    base, or standalone). *scale* multiplies the written ranges' sizes (slower merges)."""
    data = DataDir(root).ensure()
    catalogue = Catalogue(data.catalogue_path)
    base = "img-base0"
    base_file = data.images_dir / f"{base}.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base_file), str(SIZE * scale))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x01 0 {40 * scale}M", str(base_file))
    catalogue.add(Image(id=base, type=ImageType.UPLOAD, owner="local", created_at=START,
                        status=ImageStatus.AVAILABLE, name="base", path=base_file.name,
                        virtual_size=SIZE * scale))
    ids, parent = [], None if standalone_first else base
    for index, writes in enumerate(WRITES):
        image_id = f"img-snap{index}"
        path = data.images_dir / f"{image_id}.qcow2"
        if parent is None:
            run("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(base_file), str(path))
        else:
            run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                f"{parent}.qcow2", str(path))
        for command in writes:
            command = _scaled(command, scale)
            run("qemu-io", "-f", "qcow2", "-c", command, str(path))
        catalogue.add(Image(id=image_id, type=ImageType.SNAPSHOT, owner="local",
                            created_at=START + timedelta(hours=index), status=ImageStatus.AVAILABLE,
                            name=f"snap {index}", path=path.name, virtual_size=SIZE * scale,
                            ancestor_id=base, parent_id=parent, source_server=SERVER),
                      depends_on=parent)
        ids.append(image_id)
        parent = image_id
    catalogue.close()
    return Chain(data, base, ids)


def _scaled(command: str, scale: int) -> str:
    if scale == 1:
        return command
    words = command.split()
    sizes = [int(w.removesuffix("M")) * scale for w in words[-2:]]
    return " ".join([*words[:-2], *(f"{n}M" for n in sizes)])


def references(chain: Chain, into: Path) -> dict[str, Path]:
    """A standalone copy of what every image shows now."""
    into.mkdir(exist_ok=True)
    copies = {}
    for image_id in [chain.base, *chain.snapshots]:
        copies[image_id] = into / f"{image_id}.ref.qcow2"
        run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", str(chain.file(image_id)),
            str(copies[image_id]))
    return copies


def same(a: Path, b: Path) -> bool:
    done = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", str(a),
                           str(b)], capture_output=True, text=True, check=False)
    return done.returncode == 0


def fake_hypervisor(names: tuple[str, ...] = (SERVER, "srv-other")) -> FakeHypervisor:
    """The servers prune and schedules ask about (by name or by UUID), running."""
    hv = FakeHypervisor()
    for name in names:
        hv.define(DomainSpec(name=name, uuid=server_uuid(name), memory_mib=64, vcpus=1,
                             accel="tcg", disks=(), console_log=Path(f"/nowhere/{name}.log")))
        hv.start(name)
    return hv


def server_uuid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, name))


def prune(chain_root: Path, policy: Policy, *, dry_run: bool = False,
          server: str = SERVER) -> PruneReport:
    data = DataDir(chain_root)
    catalogue = Catalogue(data.catalogue_path)
    try:
        service = PruneService(catalogue, data, fake_hypervisor(),
                               ImageService(catalogue, data))
        return service.prune(server, policy, dry_run=dry_run)
    finally:
        catalogue.close()


def hold(chain: Chain, image_id: str, kind: DependentKind, dependent: str) -> None:
    catalogue = chain.catalogue()
    catalogue.add_dependent(image_id, kind, dependent)
    catalogue.close()


def main(argv: list[str]) -> None:
    root, server, keep_last = Path(argv[0]), argv[1], int(argv[2])
    if "--die-at-commit" in argv:
        # Killed right after the rename, before the catalogue records the new parent.
        def die(*_args: object, **_kwargs: object) -> None:
            os.kill(os.getpid(), signal.SIGKILL)
        Catalogue.reparent = die  # type: ignore[method-assign, assignment]
    prune(root, Policy(last=keep_last), server=server)


if __name__ == "__main__":
    main(sys.argv[1:])
