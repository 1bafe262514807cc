"""Snapshot chains: each snapshot of a running server copies only what was written since the
previous one, is stored as a delta on it, and is still exactly the server's disk.

As in test_change_tracking, every snapshot is taken and compared with the server's disk while
the server is paused (its guest writes a counter sector every 150 ms). How much each backup
job copied is QEMU's own "len", read from its BLOCK_JOB_COMPLETED event: copies of 16-64 MiB
were seen to finish here before the test could hold the job with a speed limit to read it.
Writes between snapshots go into the running disk through its device (HMP `qemu-io`), so
QEMU's dirty bitmaps record them like the guest's own.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest

from bbsnap.hypervisor import DiskSpec, DomainSpec, NicSpec
from bbsnap.services.snapshots import change_tracking
from bbsnap.tinyguest import READY_LINE, read_counter
from tests.system.conftest import (URI, backing_file, console_path, create_server,
                                   image_record, qemu_monitor, wait_for_console_line,
                                   wait_until, write_into_running_disk)
from tests.system.test_change_tracking import assert_same_disk, paused, virsh

MIB = 1 << 20
FOREIGN_SIZE = 512 * MIB


_EVENT_LOOP = threading.Lock()
_event_loop_started: list[bool] = []


def _start_event_loop() -> None:
    with _EVENT_LOOP:
        if not _event_loop_started:
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(target=_run_events, daemon=True).start()
            _event_loop_started.append(True)


def _run_events() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


class JobLengths:
    """The length of every block job QEMU completes on one domain (its own "len")."""

    def __init__(self, domain: str) -> None:
        _start_event_loop()
        self.lengths: list[int] = []
        self._conn = libvirt.open(URI)
        self._callback = libvirt_qemu.qemuMonitorEventRegister(
            self._conn, self._conn.lookupByName(domain), "BLOCK_JOB_COMPLETED", self._event,
            None, 0)

    def _event(self, _conn, _dom, _event, _seconds, _micros, details, _opaque) -> None:
        data = json.loads(details) if isinstance(details, str) else details
        self.lengths.append(int(data["len"]))

    def next(self, seen: int) -> int:
        """The length of the first job completed after *seen* lengths were recorded."""
        wait_until(lambda: len(self.lengths) > seen, 60, "the backup job to complete")
        return self.lengths[seen]

    def close(self) -> None:
        libvirt_qemu.qemuMonitorEventDeregister(self._conn, self._callback)
        self._conn.close()


@pytest.fixture()
def jobs() -> Iterator[dict[str, JobLengths]]:
    watched: dict[str, JobLengths] = {}
    yield watched
    for watcher in watched.values():
        watcher.close()


def chained_snapshot(cloud, jobs, server_id: str, disk: str) -> tuple[dict, int, str]:
    """A snapshot of the paused server: the image, QEMU's copy length and the command's
    stderr; the image is compared with the disk before the guest runs again."""
    watcher = jobs.setdefault(server_id, JobLengths(server_id))
    seen = len(watcher.lengths)
    with paused(server_id):
        result = cloud("servers", "snapshot", server_id, "--no-quiesce", "--wait")
        assert result.exit_code == 0, result.stderr
        image = image_record(cloud, result.stdout.strip())
        assert image["state"] == "available", image["failure_reason"]
        assert_same_disk(cloud, image, disk)
    return image, watcher.next(seen), result.stderr


def stored(cloud, image: dict) -> Path:
    return cloud.data_dir / "images" / f"{image['id']}.qcow2"


def assert_clone_counts_from(cloud, image: dict) -> None:
    """A server made from *image* boots and starts counting at the value the image holds."""
    captured = read_counter(stored(cloud, image))
    assert captured is not None
    (clone,) = create_server(cloud, image=image["id"])
    line = wait_for_console_line(console_path(cloud, clone["id"]), "BBSNAP-COUNTER")
    assert int(line.split()[1]) == captured
    assert cloud("servers", "destroy", clone["id"]).exit_code == 0


def ours(hypervisor, domain: str) -> list[str]:
    return [c for c in hypervisor.checkpoints(domain) if c.startswith("bbsnap-")]


def test_each_snapshot_copies_only_what_was_written_since_the_previous_one(cloud, hypervisor, jobs):
    (server,) = create_server(cloud)
    disk = server["disks"][0]
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)

    write_into_running_disk(server["id"], "write -P 0x11 512M 64M")
    first, to_copy, _ = chained_snapshot(cloud, jobs, server["id"], disk)
    assert 64 * MIB <= to_copy < 96 * MIB, to_copy  # since the server was made

    write_into_running_disk(server["id"], "write -P 0x22 768M 48M")
    second, to_copy, _ = chained_snapshot(cloud, jobs, server["id"], disk)
    assert 48 * MIB <= to_copy < 56 * MIB, to_copy  # since the first snapshot only

    write_into_running_disk(server["id"], "write -P 0x33 1024M 32M")
    third, to_copy, stderr = chained_snapshot(cloud, jobs, server["id"], disk)
    assert 32 * MIB <= to_copy < 40 * MIB, to_copy
    assert "copying the whole disk" not in stderr

    # Storage follows the chain; ancestor_id keeps the seed's meaning.
    assert [i["ancestor_id"] for i in (first, second, third)] == [cloud.image_id] * 3
    assert [i["parent_id"] for i in (first, second, third)] == [
        cloud.image_id, first["id"], second["id"]]
    assert backing_file(str(stored(cloud, second))) == (f"{first['id']}.qcow2", "qcow2")
    assert backing_file(str(stored(cloud, third))) == (f"{second['id']}.qcow2", "qcow2")
    assert third["disk_size"] < 40 * MIB and second["disk_size"] < 56 * MIB
    # Only the newest snapshot's checkpoint is kept, with the disk's birth bitmap.
    assert ours(hypervisor, server["id"]) == [f"bbsnap-{third['id']}", change_tracking.CHECKPOINT]

    for image in (first, second, third):
        assert_clone_counts_from(cloud, image)
    refused = cloud("images", "destroy", second["id"])
    assert refused.exit_code == 4 and third["id"] in refused.stderr


def define_foreign(hypervisor, domains, work_dir: Path, disk: Path, fmt: str) -> str:
    """A domain defined through plain libvirt XML (no bbsnap metadata), started and booted."""
    name = domains.new_name()
    hypervisor.define(DomainSpec(
        name=name, uuid=str(uuid.uuid4()), memory_mib=128, vcpus=1, accel="tcg",
        disks=(DiskSpec(disk, format=fmt),), console_log=work_dir / "console.log",
        nics=(NicSpec("52:54:00:aa:00:02"),), guest_agent=False))
    hypervisor.start(name)
    wait_for_console_line(work_dir / "console.log", READY_LINE)
    return name


def foreign_disk(work_dir: Path, tiny_guest_image: Path, fmt: str) -> Path:
    disk = work_dir / f"foreign.{fmt}"
    subprocess.run(["qemu-img", "convert", "-O", fmt, str(tiny_guest_image), str(disk)],
                   check=True)
    subprocess.run(["qemu-img", "resize", "-q", "-f", fmt, str(disk), str(FOREIGN_SIZE)],
                   check=True)
    # Data past the guest's partition, so that a full copy takes long enough to be held.
    subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x5a 64M 256M", str(disk)],
                   check=True, capture_output=True)
    return disk


def test_a_domain_bbsnap_did_not_make_gets_a_chain_from_a_full_first_copy(
        cloud, hypervisor, domains, work_dir, tiny_guest_image, jobs):
    disk = foreign_disk(work_dir, tiny_guest_image, "qcow2")
    name = define_foreign(hypervisor, domains, work_dir, disk, "qcow2")

    first, to_copy, _ = chained_snapshot(cloud, jobs, name, str(disk))
    assert to_copy == FOREIGN_SIZE  # no record of changes yet: the whole disk
    assert first["parent_id"] is None and first["ancestor_id"] is None
    assert "backing-filename" not in qemu_info(stored(cloud, first))
    assert ours(hypervisor, name) == [f"bbsnap-{first['id']}"]

    write_into_running_disk(name, "write -P 0x22 320M 48M")
    second, to_copy, stderr = chained_snapshot(cloud, jobs, name, str(disk))
    assert 48 * MIB <= to_copy < 56 * MIB, to_copy
    assert second["parent_id"] == first["id"] and "copying the whole disk" not in stderr
    write_into_running_disk(name, "write -P 0x33 400M 32M")
    third, to_copy, _ = chained_snapshot(cloud, jobs, name, str(disk))
    assert 32 * MIB <= to_copy < 40 * MIB, to_copy
    assert third["parent_id"] == second["id"]
    assert ours(hypervisor, name) == [f"bbsnap-{third['id']}"]
    for image in (first, second, third):
        assert_clone_counts_from(cloud, image)

    # The disk replaced by a copy of itself (another file): its bitmap is not trusted.
    hypervisor.destroy(name)
    replaced = disk.with_suffix(".new")
    subprocess.run(["cp", "--sparse=always", str(disk), str(replaced)], check=True)
    replaced.rename(disk)
    hypervisor.start(name)
    wait_for_console_line(work_dir / "console.log", READY_LINE)
    fourth, to_copy, stderr = chained_snapshot(cloud, jobs, name, str(disk))
    assert to_copy == FOREIGN_SIZE and "copying the whole disk" in stderr
    assert fourth["parent_id"] is None


def qemu_info(path: Path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                                     check=True, capture_output=True, text=True).stdout)


def test_a_raw_disk_gets_full_copies_with_a_note(cloud, hypervisor, domains, work_dir,
                                                 tiny_guest_image, jobs):
    disk = foreign_disk(work_dir, tiny_guest_image, "raw")
    name = define_foreign(hypervisor, domains, work_dir, disk, "raw")
    for _ in range(2):
        image, to_copy, stderr = chained_snapshot(cloud, jobs, name, str(disk))
        assert to_copy == FOREIGN_SIZE
        assert "raw disk" in stderr and "copying the whole disk" in stderr
        assert image["parent_id"] is None
    assert hypervisor.checkpoints(name) == []
    assert_clone_counts_from(cloud, image)


def foreign_incremental_backup(domain: str, since: str, target: Path) -> None:
    """Another tool's incremental backup from its own checkpoint, waited for: it succeeds."""
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(domain)
        dom.backupBegin(f"<domainbackup mode='push'><incremental>{since}</incremental><disks>"
                        f"<disk name='vda' backup='yes' type='file'><target file='{target}'/>"
                        "<driver type='qcow2'/></disk></disks></domainbackup>", None, 0)
        deadline = time.monotonic() + 120
        while dom.jobStats(0).get("type", 0) not in (0, libvirt.VIR_DOMAIN_JOB_COMPLETED):
            assert time.monotonic() < deadline, "the foreign backup did not finish"
            time.sleep(0.1)
        done = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        assert done["type"] == libvirt.VIR_DOMAIN_JOB_COMPLETED, done
    finally:
        conn.close()


def test_another_tools_checkpoints_and_bbsnaps_chain_both_keep_working(cloud, hypervisor,
                                                                        work_dir, jobs):
    (server,) = create_server(cloud)
    disk = server["disks"][0]
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    virsh("checkpoint-create-as", server["id"], "--name", "other-1")
    write_into_running_disk(server["id"], "write -P 0x11 512M 32M")
    first, _, _ = chained_snapshot(cloud, jobs, server["id"], disk)

    write_into_running_disk(server["id"], "write -P 0x22 768M 16M")
    virsh("checkpoint-create-as", server["id"], "--name", "other-2")
    write_into_running_disk(server["id"], "write -P 0x33 1024M 16M")
    second, to_copy, _ = chained_snapshot(cloud, jobs, server["id"], disk)
    assert 32 * MIB <= to_copy < 40 * MIB, to_copy  # both writes since the first, no more
    assert second["parent_id"] == first["id"]
    assert set(hypervisor.checkpoints(server["id"])) == {
        "other-1", "other-2", f"bbsnap-{second['id']}", change_tracking.CHECKPOINT}

    # The other tool's chain: an incremental backup from its first checkpoint still has
    # every write since (64 MiB), whatever bbsnap made and deleted in between.
    seen = len(jobs[server["id"]].lengths)
    foreign_incremental_backup(server["id"], "other-1", work_dir / "other.qcow2")
    length = jobs[server["id"]].next(seen)
    assert 64 * MIB <= length < 80 * MIB, length
    write_into_running_disk(server["id"], "write -P 0x44 1280M 32M")
    third, to_copy, _ = chained_snapshot(cloud, jobs, server["id"], disk)
    assert 32 * MIB <= to_copy < 40 * MIB, to_copy
    assert {"other-1", "other-2"} <= set(hypervisor.checkpoints(server["id"]))

    # Deleting the snapshots removes bbsnap's checkpoint (and bitmap) only.
    for image in (third, second, first):
        assert cloud("images", "destroy", image["id"]).exit_code == 0
    assert set(hypervisor.checkpoints(server["id"])) == {"other-1", "other-2",
                                                         change_tracking.CHECKPOINT}
    assert live_bitmaps(server["id"], disk) == {"other-1", "other-2",
                                                change_tracking.CHECKPOINT}


def live_bitmaps(domain: str, disk: str) -> set[str]:
    """The dirty bitmaps QEMU keeps on the disk now (it writes them to the file only when it
    closes it)."""
    nodes = json.loads(qemu_monitor(domain, '{"execute": "query-named-block-nodes"}'))["return"]
    return {bitmap["name"] for node in nodes if node.get("file") == disk
            for bitmap in node.get("dirty-bitmaps", [])}


def test_past_the_depth_bound_a_snapshot_is_stored_on_the_servers_image(cloud, hypervisor, jobs):
    cloud.env["BBSNAP_MAX_CHAIN_DEPTH"] = "3"  # the image, then two snapshots on it
    (server,) = create_server(cloud)
    disk = server["disks"][0]
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    write_into_running_disk(server["id"], "write -P 0x11 512M 32M")
    first, _, _ = chained_snapshot(cloud, jobs, server["id"], disk)
    write_into_running_disk(server["id"], "write -P 0x22 768M 32M")
    second, _, _ = chained_snapshot(cloud, jobs, server["id"], disk)
    write_into_running_disk(server["id"], "write -P 0x33 1024M 32M")
    third, to_copy, stderr = chained_snapshot(cloud, jobs, server["id"], disk)
    # Flattened: everything since the server was made, on the server's image.
    assert 96 * MIB <= to_copy < 120 * MIB, to_copy
    assert "max_chain_depth 3" in stderr
    assert [i["parent_id"] for i in (first, second, third)] == [
        cloud.image_id, first["id"], cloud.image_id]
    write_into_running_disk(server["id"], "write -P 0x44 1280M 32M")
    fourth, to_copy, _ = chained_snapshot(cloud, jobs, server["id"], disk)
    assert 32 * MIB <= to_copy < 40 * MIB, to_copy  # and the chain goes on from there
    assert fourth["parent_id"] == third["id"]
    assert_clone_counts_from(cloud, fourth)
