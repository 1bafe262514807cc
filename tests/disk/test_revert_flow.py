"""`servers revert` end to end on real qcow2 files and libvirt's test driver (no guest).

The test driver is loaded from a file holding one bbsnap server whose disk is a real
overlay in its directory; each command connects afresh, so each revert starts from that
definition. What the real guest proves (tests/system/test_revert.py) is not claimed here:
this checks the files, the catalogue's holds and the definition the revert writes.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.disks import qemu_img
from bbsnap.hypervisor import DiskSpec, DomainSpec
from bbsnap.hypervisor.domain_xml import build_domain_xml
from bbsnap.state.layout import DataDir
from bbsnap.models import DependentKind, Image, ImageStatus, ImageType
from bbsnap.services.snapshots import change_tracking

SERVER = "srv-revrt"
MIB = 1 << 20


def _image(data: DataDir, catalogue: Catalogue, image_id: str, image_type: ImageType,
           source: str | None) -> None:
    path = data.images_dir / f"{image_id}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(64 * MIB)],
                   check=True)
    catalogue.add(Image(id=image_id, type=image_type, owner="me", created_at=utcnow(),
                        status=ImageStatus.AVAILABLE, name=image_id, path=path.name,
                        virtual_size=64 * MIB, source_server=source))


def _setup(bbsnap) -> tuple[Path, Path]:
    """A catalogue with the base image and two snapshots of the server, its disk, and the
    test driver's file defining it; returns (driver file, the server's disk)."""
    data = DataDir(bbsnap.data_dir).ensure()
    catalogue = Catalogue(data.catalogue_path)
    _image(data, catalogue, "img-base0", ImageType.UPLOAD, None)
    _image(data, catalogue, "img-snap1", ImageType.SNAPSHOT, SERVER)
    _image(data, catalogue, "img-snap2", ImageType.SNAPSHOT, SERVER)
    catalogue.add_dependent("img-base0", DependentKind.SERVER, SERVER)
    catalogue.close()
    directory = data.server_dir(SERVER)
    directory.mkdir(parents=True)
    disk = directory / "disk.qcow2"
    change_tracking.new_tracked_overlay(data, "img-base0", data.images_dir / "img-base0.qcow2",
                                        64 * MIB, disk)
    xml = build_domain_xml(DomainSpec(
        name=SERVER, uuid=str(uuid.uuid4()), memory_mib=128, vcpus=1, accel="tcg",
        disks=(DiskSpec(disk),), console_log=directory / "console.log", title="dev",
        metadata={"name": "dev", "image_id": "img-base0"})).replace('type="qemu"',
                                                                     'type="test"')
    driver = bbsnap.data_dir.parent / "node.xml"
    driver.write_text(f"<node>{xml}</node>")
    return driver, disk


def _holders(bbsnap) -> dict[str, list[str]]:
    catalogue = Catalogue(DataDir(bbsnap.data_dir).catalogue_path)
    try:
        return {i: [d.dependent_id for d in catalogue.dependents(i)]
                for i in ("img-base0", "img-snap1", "img-snap2")}
    finally:
        catalogue.close()


def test_revert_makes_a_tracked_overlay_on_the_snapshot_and_drops_the_old_disk(bbsnap):
    driver, disk = _setup(bbsnap)
    connect = ("-c", f"test://{driver}")
    result = bbsnap(*connect, "servers", "revert", SERVER, "--format", "json")
    assert result.exit_code == 0, result.stderr
    (after,) = json.loads(result.stdout)
    assert (after["id"], after["name"], after["image_id"]) == (SERVER, "dev", "img-snap2")
    (new_disk,) = after["disks"]
    assert Path(new_disk).parent == disk.parent and not disk.exists()
    info = qemu_img.info(Path(new_disk), "qcow2")
    assert info.backing_file is not None and info.backing_file.endswith("img-snap2.qcow2")
    marker = disk.parent / change_tracking.MARKER
    assert marker.read_text().strip() == Path(new_disk).name, "the new disk is tracked"
    assert _holders(bbsnap) == {"img-base0": [], "img-snap1": [], "img-snap2": [SERVER]}
    assert not (disk.parent / ".rebuilding").exists()


def test_a_refused_revert_changes_nothing(bbsnap):
    driver, disk = _setup(bbsnap)
    connect = ("-c", f"test://{driver}")
    before = sorted(p.name for p in disk.parent.iterdir())
    refused = bbsnap(*connect, "servers", "revert", SERVER, "img-base0")
    assert refused.exit_code == 4 and f"servers rebuild {SERVER} img-base0" in refused.stderr
    assert sorted(p.name for p in disk.parent.iterdir()) == before
    assert _holders(bbsnap)["img-base0"] == [SERVER]
