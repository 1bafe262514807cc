"""Changed-block tracking: a bbsnap server's snapshot copies only what its guest wrote, and is
still exactly its disk — also when the tracking broke and the snapshot fell back to a full copy,
and after a rebuild gave the server a new disk.

Each snapshot here is taken and compared with the server's disk while the server is paused
(its guest writes a counter sector every 150 ms), so the image must be identical to the
server's disk (`qemu-img compare`), whatever was copied to make it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bbsnap.disks import qemu_img
from bbsnap.services.snapshots import change_tracking
from bbsnap.tinyguest import READY_LINE
from tests.system.conftest import (URI, backing_file, console_path, create_server, image_record,
                                   set_backup_speed, tiny_guest_with_data,
                                   wait_for_console_line, wait_settled, wait_until,
                                   write_into_running_disk)

MIB = 1 << 20


@pytest.fixture(scope="module")
def data_guest_image(tiny_guest_image, test_root) -> Path:
    """The tiny guest on a 1 GiB disk with 64 MiB of data past its partition."""
    return tiny_guest_with_data(tiny_guest_image, test_root / "data-guest.qcow2",
                                "0x5a 256M 64M")


def virsh(*args: str) -> None:
    subprocess.run(["virsh", "-q", "-c", URI, *args], check=True, capture_output=True)


@contextmanager
def paused(server_id: str) -> Iterator[None]:
    """The guest's counter writes a sector every 150 ms: anything compared with the live disk
    must be compared before the guest runs again."""
    virsh("suspend", server_id)
    try:
        yield
    finally:
        virsh("resume", server_id)


def snapshot_available(cloud, server_id: str) -> tuple[dict, str]:
    """A snapshot of the server, waited for, and the command's stderr."""
    result = cloud("servers", "snapshot", server_id, "--no-quiesce", "--wait")
    assert result.exit_code == 0, result.stderr
    record = image_record(cloud, result.stdout.strip())
    assert record["state"] == "available", record["failure_reason"]
    return record, result.stderr


def throttled_snapshot(cloud, server_id: str) -> tuple[dict, int, str]:
    """A snapshot of the running server whose copy is held while QEMU is asked how much it has
    to copy: the image once available, that length, and the command's stderr."""
    result = cloud.process("servers", "snapshot", server_id, "--no-quiesce")
    assert result.exit_code == 0, result.stderr
    (to_copy,) = set_backup_speed(server_id, 1)
    set_backup_speed(server_id, 0)
    image = wait_settled(cloud, result.stdout.strip())
    assert image["state"] == "available", image["failure_reason"]
    return image, to_copy, result.stderr


def assert_same_disk(cloud, image: dict, server_disk: str) -> None:
    stored = cloud.data_dir / "images" / f"{image['id']}.qcow2"
    compared = subprocess.run(["qemu-img", "compare", "-U", str(stored), server_disk],
                              capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr


def test_snapshot_copies_only_what_the_guest_wrote_and_is_exactly_its_disk(cloud, hypervisor,
                                                                           data_guest_image):
    imported = cloud("images", "import", str(data_guest_image), "--name", "data")
    assert imported.exit_code == 0, imported.stderr
    ancestor = imported.stdout.strip()
    (server,) = create_server(cloud, "--no-start", image=ancestor)
    disk = server["disks"][0]
    virtual_size = qemu_img.info(Path(disk), "qcow2").virtual_size
    # Writes made while the server is off, through QEMU's block layer like the guest's:
    # zeroes over the image's data (they must hide it), data of its own, and 256 MiB more
    # so the copy runs long enough to be looked at.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -z 256M 1M",
                    "-c", "write -P 0x33 300M 8M", "-c", "write -P 0x44 512M 256M", disk],
                   check=True, capture_output=True)
    assert cloud("servers", "start", server["id"]).exit_code == 0
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    assert not hypervisor.has_checkpoint(server["id"], change_tracking.CHECKPOINT)

    with paused(server["id"]):  # nothing changes under the snapshot, nor before the compare
        image, to_copy, _ = throttled_snapshot(cloud, server["id"])
        # What QEMU's backup job had to copy: the guest's writes, not the 2 GiB disk.
        assert 265 * MIB <= to_copy < 320 * MIB, (to_copy, virtual_size)
        assert_same_disk(cloud, image, disk)

    assert image["ancestor_id"] == ancestor and image["parent_id"] == ancestor
    stored = str(cloud.data_dir / "images" / f"{image['id']}.qcow2")
    assert backing_file(stored)[0] == f"{ancestor}.qcow2"
    # The birth bitmap stays (a chain past its depth bound restarts from it); the snapshot's
    # own checkpoint starts the chain.
    assert hypervisor.has_checkpoint(server["id"], change_tracking.CHECKPOINT)
    assert hypervisor.has_checkpoint(server["id"], f"bbsnap-{image['id']}")


def test_a_qemu_killed_without_saving_its_tracking_gives_a_full_copy_that_is_still_right(
        cloud, hypervisor):
    (server,) = create_server(cloud)
    disk = server["disks"][0]
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    pid = int(Path(f"/run/libvirt/qemu/{server['id']}.pid").read_text())
    os.kill(pid, signal.SIGKILL)  # QEMU can't store the bitmap: it is left marked in use
    wait_until(lambda: hypervisor.info(server["id"]).state.value == "shutoff", 60,
               "the server to be off")
    assert cloud("servers", "start", server["id"]).exit_code == 0
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)

    with paused(server["id"]):
        image, stderr = snapshot_available(cloud, server["id"])
        assert_same_disk(cloud, image, disk)

    assert "copying the whole disk" in stderr
    assert not hypervisor.has_checkpoint(server["id"], change_tracking.CHECKPOINT)
    assert not (cloud.data_dir / "servers" / server["id"] / change_tracking.MARKER).exists()
    assert image["parent_id"] == cloud.image_id  # the full copy, stored on the server's image
    with paused(server["id"]):
        again, stderr = snapshot_available(cloud, server["id"])
        assert_same_disk(cloud, again, disk)
    # No retry of the broken tracking: the full copy's own checkpoint started a new chain.
    assert "copying the whole disk" not in stderr
    assert again["parent_id"] == image["id"]


def test_rebuild_tracks_the_new_disk(cloud, hypervisor):
    (server,) = create_server(cloud)
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    first, _ = snapshot_available(cloud, server["id"])

    result = cloud("servers", "rebuild", server["id"], first["id"], "--format", "json")
    assert result.exit_code == 0, result.stderr
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    disk = hypervisor.disks(server["id"])[0].path
    assert backing_file(disk)[0].endswith(f"{first['id']}.qcow2")
    marker = cloud.data_dir / "servers" / server["id"] / change_tracking.MARKER
    assert marker.read_text().strip() == Path(disk).name

    # The rebuilt server's own writes, taking the guest's path into its new disk.
    write_into_running_disk(server["id"], "write -P 0x44 512M 256M")

    with paused(server["id"]):
        second, to_copy, stderr = throttled_snapshot(cloud, server["id"])
        assert 256 * MIB <= to_copy < 320 * MIB, to_copy  # the writes, not the 2 GiB disk
        assert_same_disk(cloud, second, disk)

    assert "copying the whole disk" not in stderr
    assert second["ancestor_id"] == first["id"]
