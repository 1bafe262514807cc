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
from bbsnap.models import DependentKind, Image, ImageStatus, ImageType, ImageVolume
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


# -- a domain bbsnap did not create, and several disks -------------------------------------

def _snapshot_with_volumes(data: DataDir, image_id: str, source: str,
                           devices: tuple[str, ...]) -> None:
    """A multi-disk snapshot row as a finished snapshot leaves it: the first disk's file is
    the image's own, each further disk's a volume."""
    catalogue = Catalogue(data.catalogue_path)
    try:
        path = data.images_dir / f"{image_id}.qcow2"
        qemu_img.create_blank(path, 64 * MIB)
        catalogue.add(Image(id=image_id, type=ImageType.SNAPSHOT, owner="me",
                            created_at=utcnow(), status=ImageStatus.CREATING, name=image_id,
                            path=path.name, virtual_size=64 * MIB, source_server=source))
        volumes = []
        for device in devices:
            volume = data.images_dir / f"{image_id}.{device}.qcow2"
            qemu_img.create_blank(volume, 32 * MIB)
            volumes.append(ImageVolume(device=device, path=volume.name,
                                       virtual_size=32 * MIB, disk_size=0))
        catalogue.finish_snapshot(image_id, volumes, status=ImageStatus.AVAILABLE)
    finally:
        catalogue.close()


def _driver_with(bbsnap, spec: DomainSpec) -> tuple[str, str]:
    xml = build_domain_xml(spec).replace('type="qemu"', 'type="test"')
    driver = bbsnap.data_dir.parent / "node.xml"
    driver.write_text(f"<node>{xml}</node>")
    return "-c", f"test://{driver}"


def test_a_domain_bbsnap_did_not_create_is_reverted_into_its_own_directory(bbsnap, tmp_path):
    data = DataDir(bbsnap.data_dir).ensure()
    users = tmp_path / "libvirt-images"
    users.mkdir()
    disk = users / "web.qcow2"
    qemu_img.create_blank(disk, 64 * MIB)
    domain_uuid = str(uuid.uuid4())
    connect = _driver_with(bbsnap, DomainSpec(
        name="web", uuid=domain_uuid, memory_mib=128, vcpus=1, accel="tcg",
        disks=(DiskSpec(disk),), console_log=users / "web.log"))
    _snapshot_with_volumes(data, "img-snap1", "web", ())
    result = bbsnap(*connect, "servers", "revert", "web", "--format", "json")
    assert result.exit_code == 0, result.stderr
    (after,) = json.loads(result.stdout)
    assert after["id"] == "web" and after["image_id"] is None, "no bbsnap metadata written"
    (new_disk,) = after["disks"]
    directory = data.domain_dir(domain_uuid)
    assert Path(new_disk).parent == directory
    assert qemu_img.info(Path(new_disk), "qcow2").backing_file.endswith("img-snap1.qcow2")
    assert disk.exists(), "the disk the domain came with is the user's: kept"
    assert f"previous disk vda is kept at {disk}" in result.stderr
    origin = json.loads((directory / "origin.json").read_text())
    assert origin == {"connect": connect[1], "domain_uuid": domain_uuid}
    assert (directory / change_tracking.MARKER).read_text().strip() == Path(new_disk).name
    assert not (directory / ".rebuilding").exists()
    catalogue = Catalogue(data.catalogue_path)
    try:
        assert [d.dependent_id for d in catalogue.dependents("img-snap1")] == ["web"]
    finally:
        catalogue.close()


def test_every_disk_of_a_multi_disk_server_is_reverted_in_one_definition(bbsnap):
    driver, disk = _setup(bbsnap)
    data = DataDir(bbsnap.data_dir)
    second = disk.parent / "disk1.qcow2"
    qemu_img.create_blank(second, 32 * MIB)
    xml = driver.read_text().replace("</disk>", f"""</disk><disk type="file" device="disk">
      <driver name="qemu" type="qcow2"/><source file="{second}"/>
      <target dev="vdb" bus="virtio"/></disk>""", 1)
    driver.write_text(xml)
    connect = ("-c", f"test://{driver}")
    _snapshot_with_volumes(data, "img-multi", SERVER, ("vdb",))
    _snapshot_with_volumes(data, "img-wrong", SERVER, ("vdc",))

    refused = bbsnap(*connect, "servers", "revert", SERVER, "img-wrong")
    assert refused.exit_code == 4
    assert "has disks for vda, vdc and server srv-revrt has writable disks vda, vdb" \
        in refused.stderr
    assert disk.exists() and second.exists()

    result = bbsnap(*connect, "servers", "revert", SERVER, "img-multi", "--format", "json")
    assert result.exit_code == 0, result.stderr
    (after,) = json.loads(result.stdout)
    first_new, second_new = (Path(p) for p in after["disks"])
    assert qemu_img.info(first_new, "qcow2").backing_file.endswith("img-multi.qcow2")
    assert qemu_img.info(second_new, "qcow2").backing_file.endswith("img-multi.vdb.qcow2")
    assert second_new.name.endswith("-vdb.qcow2")
    assert not disk.exists() and not second.exists(), "bbsnap's old overlays are gone"
    assert after["image_id"] == "img-multi"
