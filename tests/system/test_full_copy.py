"""Full copies (issue #15): the first snapshot of a domain bbsnap did not make copies its
standalone disk whole, through QEMU's push-mode backup job, the copy written out while QEMU
makes it, and the finished file vetted by its header.

The copy must be exactly the disk at the snapshot's instant although the guest keeps
writing during the copy (its counter, and writes over the very data being copied), and
a worker SIGKILLed mid-copy must be adopted by the next command and finish the same copy.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import uuid
from pathlib import Path

from bbsnap.disks import qemu_img
from bbsnap.hypervisor import DiskSpec, DomainSpec, NicSpec
from bbsnap.state.layout import DataDir
from bbsnap.tinyguest import READY_LINE, read_counter
from tests.system.conftest import (image_record, set_backup_speed, tiny_guest_with_data,
                                   wait_for_console_line, wait_settled, wait_until,
                                   write_into_running_disk)
from tests.system.test_change_tracking import paused


def job_token(cloud, image_id: str) -> str | None:
    with sqlite3.connect(cloud.data_dir / "catalogue.sqlite3") as db:
        return db.execute("SELECT job FROM images WHERE id = ?", (image_id,)).fetchone()[0]


def _foreign_guest(hypervisor, domains, work_dir: Path, tiny_guest_image: Path, data: str,
                   mac: str) -> tuple[str, Path]:
    """A running tiny guest bbsnap did not make, on a standalone disk holding *data*
    (qemu-io's "PATTERN OFFSET LENGTH") past its partition; its name and disk."""
    disk = tiny_guest_with_data(tiny_guest_image, work_dir / "foreign.qcow2", data)
    name = domains.new_name()
    console = work_dir / "console.log"
    hypervisor.define(DomainSpec(
        name=name, uuid=str(uuid.uuid4()), memory_mib=128, vcpus=1, accel="tcg",
        disks=(DiskSpec(disk),), console_log=console, nics=(NicSpec(mac),),
        guest_agent=False))
    hypervisor.start(name)
    wait_for_console_line(console, READY_LINE)
    return name, disk


def test_full_copy_is_the_disk_at_its_instant_while_the_guest_writes_and_a_killed_worker_is_adopted(
        cloud, hypervisor, domains, work_dir, tiny_guest_image):
    # 512 MiB of data past the guest's partition, for the copy to have something to slow.
    name, disk = _foreign_guest(hypervisor, domains, work_dir, tiny_guest_image,
                                "0x5a 512M 512M", "52:54:00:aa:00:02")

    reference = work_dir / "at-the-instant.qcow2"
    with paused(name):
        # Paused, the disk stands still from the instant until the reference is copied.
        result = cloud.process("servers", "snapshot", name, "--no-quiesce")
        assert result.exit_code == 0, result.stderr
        image_id = result.stdout.strip()
        # The command recorded its forked worker before it returned. Stopped at once, the
        # worker cannot settle the image before the test kills it: QEMU's job may still run
        # to its end meanwhile (set-speed only slows the chunks not yet in flight, and 64
        # workers of up to 16 MiB each can have the whole 1 GiB in flight), which the
        # adopting worker then reads as libvirt's completed job.
        worker = job_token(cloud, image_id)
        assert worker, "the command returned without recording its worker"
        os.kill(int(worker.split(":")[0]), signal.SIGSTOP)
        # QEMU writes the copy into RAM (snapshots/targets.py), not into tmp/.
        assert [p.name.split(".", 1)[1] for p in DataDir(cloud.data_dir).ram_files()] == [
            f"{image_id}.vda.copy.qcow2"]
        assert list((cloud.data_dir / "tmp").iterdir()) == []
        # (No job left: QEMU finished already, and the adopter gets its completed job.)
        assert set_backup_speed(name, 1) in ([], [1 << 30]), "a full copy: the whole disk"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(disk), str(reference)],
                       check=True)
    counted = read_counter(reference)
    assert counted is not None

    # The guest writes during the copy: its counter, and new bytes over the data QEMU has
    # still to copy (copy-before-write must keep the old ones for the snapshot).
    write_into_running_disk(name, "write -P 0x66 600M 64M")
    wait_until(lambda: (read_counter(disk) or 0) > counted, 60, "the guest to count on")

    os.kill(int(worker.split(":")[0]), signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{worker.split(':')[0]}").exists(), 30, "the worker to die")
    assert image_record(cloud, image_id)["state"] == "creating"  # this command adopts it
    wait_until(lambda: job_token(cloud, image_id) not in (None, worker), 30, "a new worker")
    set_backup_speed(name, 0)
    image = wait_settled(cloud, image_id)
    assert image["state"] == "available", image["failure_reason"]

    stored = cloud.data_dir / "images" / f"{image_id}.qcow2"
    compared = subprocess.run(["qemu-img", "compare", str(stored), str(reference)],
                              capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert read_counter(stored) == counted
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(stored)],
                                     check=True, capture_output=True, text=True).stdout)
    assert "backing-filename" not in info, "standalone"
    assert image["virtual_size"] == info["virtual-size"] == 1 << 30
    assert image["disk_size"] == os.stat(stored).st_blocks * 512 > 512 << 20
    assert qemu_img.check(stored).clean
    assert list((cloud.data_dir / "tmp").iterdir()) == [], "temporary files left behind"
    assert DataDir(cloud.data_dir).ram_files() == [], "the copy in RAM left behind"
    assert sorted(p.name for p in (cloud.data_dir / "images").iterdir()
                  if p.name.startswith(image_id)) == [f"{image_id}.qcow2"]
    # The domain's own disk is untouched: the same file, no backing file, sound.
    assert hypervisor.disks(name)[0].path == str(disk)
    assert qemu_img.check(disk, force_share=True).corruptions == 0
    assert hypervisor.info(name).state.value == "running"


def test_a_copy_in_ram_that_the_disk_cannot_take_fails_and_leaves_nothing(
        cloud, hypervisor, domains, work_dir, tiny_guest_image):
    """The copy reached RAM, but images/ has no room for it: the image fails, with no copy
    left in RAM nor a partial one in images/, and the guest runs on."""
    name, disk = _foreign_guest(hypervisor, domains, work_dir, tiny_guest_image,
                                "0x5a 512M 32M", "52:54:00:aa:00:03")
    images = cloud.data_dir / "images"
    before = sorted(p.name for p in images.iterdir())
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0710", "tmpfs", str(images)],
                   check=True)
    try:
        result = cloud("servers", "snapshot", name, "--no-quiesce", "--wait")
        assert result.exit_code == 1 and "failed" in result.stderr, result.stderr
        image = image_record(cloud, result.stdout.strip())
        assert image["state"] == "failed"
        assert "could not be written" in image["failure_reason"], image["failure_reason"]
        assert list(images.iterdir()) == [], "a partial copy left in images/"
    finally:
        subprocess.run(["umount", "-l", str(images)], check=True)
    assert sorted(p.name for p in images.iterdir()) == before
    assert DataDir(cloud.data_dir).ram_files() == [], "the copy in RAM left behind"
    assert list((cloud.data_dir / "tmp").iterdir()) == []
    assert hypervisor.info(name).state.value == "running"
    assert qemu_img.check(disk, force_share=True).corruptions == 0
