"""Reverting domains bbsnap did not create, and every disk of a multi-disk one, under the real
libvirtd (TCG), proven with the tiny guest's counter and a data disk's bytes.

Such a domain is defined here through plain libvirt XML (as virt-manager or virsh would),
with its disks outside bbsnap's data directory. A revert must give it the snapshot's
content, keep its identity and the disks it came with, write no bbsnap metadata into its
definition, and leave a tracked disk whose next snapshot is a delta on the reverted-to one.
"""

from __future__ import annotations

import json
import random
import subprocess
import uuid
from pathlib import Path

from bbsnap.hypervisor import DiskSpec, DomainSpec, NicSpec
from bbsnap.hypervisor.domain_xml import METADATA_NS
from bbsnap.tinyguest import READY_LINE
from tests.system.conftest import (backing_file, file_digest, image_record, qemu_monitor,
                                   wait_for_console_line, wait_until)
from tests.system.test_revert import counter, holders, kill_revert_after, snapshot

MIB = 1 << 20


def define_foreign(hypervisor, domains, work_dir: Path, disks: tuple[DiskSpec, ...]) -> str:
    name = domains.new_name()
    hypervisor.define(DomainSpec(
        name=name, uuid=str(uuid.uuid4()), memory_mib=128, vcpus=1, accel="tcg",
        disks=disks, console_log=work_dir / "console.log",
        nics=(NicSpec("52:54:00:aa:00:03"),), guest_agent=False))
    hypervisor.start(name)
    wait_for_console_line(work_dir / "console.log", READY_LINE)
    return name


def users_disk(work_dir: Path, tiny_guest_image: Path) -> Path:
    """The tiny guest as a standalone qcow2 outside the data directory (the user's file)."""
    disk = work_dir / "users" / "web.qcow2"
    disk.parent.mkdir()
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(tiny_guest_image), str(disk)],
                   check=True)
    return disk


def booted_counter(log: Path) -> int:
    return int(wait_for_console_line(log, "BBSNAP-COUNTER").split()[1])


def revert(cloud, server: str, *image: str) -> tuple[dict, str]:
    result = cloud("servers", "revert", server, *image, "--format", "json")
    assert result.exit_code == 0, result.stderr
    (after,) = json.loads(result.stdout)
    return after, result.stderr


def test_a_domain_bbsnap_did_not_create_is_reverted_and_keeps_its_own_disk(
        cloud, hypervisor, domains, work_dir, tiny_guest_image):
    disk = users_disk(work_dir, tiny_guest_image)
    name = define_foreign(hypervisor, domains, work_dir, (DiskSpec(disk),))
    before = cloud("servers", "show", name, "--format", "json")
    shown = json.loads(before.stdout)
    wait_until(lambda: counter(disk) >= 3, 60, "the counter to reach 3")
    first, at_first = snapshot(cloud, name)
    wait_until(lambda: counter(disk) > at_first + 3, 60, "writes after it")
    second, at_second = snapshot(cloud, name)

    after, stderr = revert(cloud, name, first)
    assert (after["id"], after["uuid"], after["macs"]) == (shown["id"], shown["uuid"],
                                                           shown["macs"])
    assert after["status"] == "active" and after["managed"] is False
    assert booted_counter(work_dir / "console.log") == at_first
    (new_disk,) = after["disks"]
    directory = cloud.data_dir / "servers" / f"dom-{shown['uuid']}"
    assert Path(new_disk).parent == directory
    assert f"previous disk vda is kept at {disk}" in stderr and disk.exists()
    kept = file_digest(disk)
    assert METADATA_NS not in hypervisor.domain_xml(name, inactive=True), \
        "no bbsnap metadata in the user's definition"

    # Its next snapshot is a delta on the reverted-to snapshot, from the new disk's bitmap.
    wait_until(lambda: counter(new_disk) > at_first, 60, "writes after the revert")
    third, _ = snapshot(cloud, name)
    record = image_record(cloud, third)
    assert (record["parent_id"], record["ancestor_id"]) == (first, first)
    assert record["disk_size"] < 8 * MIB, "a delta, not a full copy"

    back, _ = revert(cloud, name, second)
    assert booted_counter(work_dir / "console.log") == at_second
    assert not Path(new_disk).exists(), "bbsnap's own overlay of the first revert is removed"
    assert [p.name for p in directory.glob("disk*.qcow2")] == [Path(back["disks"][0]).name]
    assert file_digest(disk) == kept, "the user's disk is never touched again"
    # doctor --fix knows whose directory it is: nothing of it is reclaimed while it runs.
    fixed = cloud("doctor", "--fix")
    assert str(directory) not in fixed.stdout + fixed.stderr
    assert Path(back["disks"][0]).exists() and (directory / "origin.json").exists()
    assert not list((cloud.data_dir / "quarantine").glob("*/*")), "nothing quarantined"
    refused = cloud("servers", "destroy", name)
    assert refused.exit_code == 4 and "not created by bbsnap" in refused.stderr


def test_every_disk_of_a_multi_disk_domain_goes_back_to_the_snapshot(
        cloud, hypervisor, domains, work_dir, tiny_guest_image):
    disk = users_disk(work_dir, tiny_guest_image)
    data = work_dir / "users" / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), str(32 * MIB)],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", str(data)],
                   check=True, capture_output=True)
    name = define_foreign(hypervisor, domains, work_dir,
                          (DiskSpec(disk), DiskSpec(data, target="vdb")))
    wait_until(lambda: counter(disk) >= 3, 60, "the counter to reach 3")
    image, at_image = snapshot(cloud, name)
    # The data disk changed after the snapshot, through the running guest's own device.
    out = qemu_monitor(name, 'qemu-io -d virtio-disk1/virtio-backend "write -P 0x22 0 4M"',
                       hmp=True)
    assert not out.strip(), out

    after, _ = revert(cloud, name, image)
    assert booted_counter(work_dir / "console.log") == at_image
    first_new, data_new = after["disks"]
    assert Path(data_new).name.endswith("-vdb.qcow2")
    reads = subprocess.run(["qemu-io", "-U", "-r", "-f", "qcow2", "-c", "read -P 0x11 0 4M",
                            data_new], capture_output=True, text=True, check=True)
    assert "Pattern verification failed" not in reads.stdout, "vdb is back at the snapshot"
    assert data.exists() and disk.exists(), "the user's disks are kept"


def test_a_killed_revert_of_a_foreign_domain_is_settled_by_the_next_command(
        cloud, hypervisor, domains, work_dir, tiny_guest_image):
    disk = users_disk(work_dir, tiny_guest_image)
    name = define_foreign(hypervisor, domains, work_dir, (DiskSpec(disk),))
    wait_until(lambda: counter(disk) >= 3, 60, "the counter to reach 3")
    first, _ = snapshot(cloud, name)
    second, _ = snapshot(cloud, name)
    uuid_ = hypervisor.info(name).uuid
    directory = cloud.data_dir / "servers" / f"dom-{uuid_}"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for kill in range(3):
        kill_revert_after(cloud, name, (first, second)[kill % 2], rng.uniform(0.2, 2.5))
        shown = cloud("servers", "show", name, "--format", "json")  # recovers first
        assert shown.exit_code == 0, shown.stderr
        record = json.loads(shown.stdout)
        assert record["status"] == "active", f"seed {seed} kill {kill}"
        (now,) = record["disks"]
        assert not (directory / ".rebuilding").exists()
        ours = sorted(p.name for p in directory.glob("disk*.qcow2")) if directory.exists() else []
        assert ours == ([] if now == str(disk) else [Path(now).name]), f"seed {seed}"
        held = {i for i, who in holders(cloud).items() if name in who}
        assert held == (set() if now == str(disk) else {Path(backing_file(now)[0]).stem})
        assert disk.exists(), "the user's disk survives every kill"
