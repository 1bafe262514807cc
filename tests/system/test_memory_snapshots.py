"""Memory-state snapshots under the real libvirtd (TCG), proven with the tiny guest's two
counters: BBSNAP-MEMCOUNTER lives only in the guest's memory (a boot starts it at 1), the
disk counter lives on its disk.

A revert to a memory snapshot must show the memory counter going on from its value at the
snapshot with no boot in between, on the snapshot's disk counter; `--disk-only` and clones
boot afresh from the disk; refusals change nothing; a SIGKILL at any point of the save or
the restore, or a libvirtd restart during the save, leaves the server running on a whole
disk with nothing temporary left.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from bbsnap.disks import qemu_img
from bbsnap.services.memory_file import zstd
from bbsnap.services.snapshots import timeline
from bbsnap.state.layout import DataDir
from bbsnap.tinyguest import MEMCOUNTER_PREFIX, READY_LINE, read_counter
from tests.system.conftest import (console_path, create_server, define_xml, file_digest,
                                   image_record, server_record,
                                   wait_for_console_line, wait_settled, wait_until)
from tests.system.libvirtd import restart_libvirtd


def mem_counters(cloud, server_id: str) -> list[int]:
    log = console_path(cloud, server_id)
    if not log.exists():
        return []
    # Whole lines only: the serial console is written a character at a time.
    return [int(line.split()[1])
            for line in log.read_text(errors="replace").splitlines(keepends=True)
            if line.endswith("\n") and line.startswith(MEMCOUNTER_PREFIX)
            and line.split()[1:2] != [""] and line.split()[1].isdigit()]


def last_mem_counter(cloud, server_id: str) -> int:
    found = mem_counters(cloud, server_id)
    return found[-1] if found else 0


def disk_counter(disk: str | Path) -> int:
    value = read_counter(Path(disk))
    return -1 if value is None else value


def state(server_id: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", "domstate", server_id],
                          capture_output=True, text=True).stdout.strip()


def booted(cloud, memory: str = "128", *args: str, image: str | None = None) -> dict:
    (server,) = create_server(cloud, "--memory", memory, *args, image=image)  # the last wins
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    wait_until(lambda: last_mem_counter(cloud, server["id"]) >= 3, 60, "the memory counter")
    return server


def memory_snapshot(cloud, server_id: str) -> tuple[str, int, int]:
    """A memory snapshot and the memory counter just before and just after the command."""
    before = last_mem_counter(cloud, server_id)
    result = cloud("servers", "snapshot", server_id, "--memory")
    after = last_mem_counter(cloud, server_id)
    assert result.exit_code == 0, result.stderr
    image_id = result.stdout.strip()
    record = wait_settled(cloud, image_id)
    assert record["state"] == "available", record["failure_reason"]
    return image_id, before, after


def internal_snapshots(disk: str) -> list[str]:
    return qemu_img.snapshot_names(Path(disk))


def work_files(cloud) -> list[str]:
    """What the data directory's jobs left in tmp/ and in the RAM work directory."""
    return sorted([p.name for p in (cloud.data_dir / "tmp").iterdir()]
                  + [p.name for p in DataDir(cloud.data_dir).ram_files()])


def revert(cloud, server_id: str, *args: str) -> dict:
    result = cloud("servers", "revert", server_id, *args, "--format", "json")
    assert result.exit_code == 0, result.stderr
    (after,) = json.loads(result.stdout)
    return after


def test_revert_resumes_the_guest_where_the_memory_snapshot_was(cloud, hypervisor):
    server = booted(cloud)
    srv, disk = server["id"], server["disks"][0]
    image_id, before, after = memory_snapshot(cloud, srv)
    record = image_record(cloud, image_id)
    memory_file = cloud.data_dir / "images" / f"{image_id}.memory.zst"
    assert record["memory_state"] is True
    assert memory_file.stat().st_mode & 0o777 == 0o600, "the guest's secrets: owner only"
    with zstd.open(memory_file) as packed:
        assert packed.read(16) == b"LibvirtQemudSave"  # libvirt's save image, compressed
    disk_file = cloud.data_dir / "images" / f"{image_id}.qcow2"
    assert record["disk_size"] > memory_file.stat().st_size, "the memory volume is counted"
    assert server_record(cloud, srv)["disks"] == [disk], "the guest's disk chain is as before"
    assert internal_snapshots(disk) == [] and work_files(cloud) == []
    made = timeline.parse((cloud.data_dir / "logs" / f"{image_id}.log").read_text(),
                          timeline.COMMAND_PREFIX)
    labels = [label for label, _ in made.marks] if made else []
    assert "disks-released" in labels, "QEMU's image locks were seen released during the save"
    assert made.durations["memory-save-in-ram"] == 1.0, "libvirt wrote the save into RAM"
    assert labels.index("disks-released") < labels.index("memory-saved") \
        < labels.index("disk-states") < labels.index("resumed"), \
        "the disk states were made while libvirt ended the save, before the guest ran again"
    at_snapshot = disk_counter(disk_file)
    files = {p: file_digest(p) for p in (memory_file, disk_file)}

    wait_until(lambda: last_mem_counter(cloud, srv) > after + 4, 60, "the guest to go on")
    wait_until(lambda: disk_counter(disk) > at_snapshot + 5, 60, "disk writes after it")
    assert state(srv) == "running"
    qemu_log = Path(f"/var/log/libvirt/qemu/{srv}.log")
    logged = qemu_log.read_text()
    reverted = revert(cloud, srv, image_id)
    assert "terminating on signal" not in qemu_log.read_text()[len(logged):], \
        "the old QEMU, whose whole state the revert replaces, was killed, not terminated"
    assert reverted["status"] == "active" and reverted["image_id"] == image_id
    wait_until(lambda: mem_counters(cloud, srv), 60, "the memory counter after the revert")
    first = mem_counters(cloud, srv)[0]
    assert before < first <= after + 2, (before, first, after)
    log = console_path(cloud, srv).read_text(errors="replace")
    assert READY_LINE not in log and "BBSNAP-SEED" not in log, "no boot in between"
    new_disk = reverted["disks"][0]
    assert new_disk != disk and not Path(disk).exists()
    assert at_snapshot <= disk_counter(new_disk) < at_snapshot + 20, "the snapshot's disk"
    assert files == {p: file_digest(p) for p in files}, "the snapshot's files are never written"
    assert work_files(cloud) == []
    steps = timeline.parse((cloud.data_dir / "logs" / f"revert-{server['uuid']}.log").read_text())
    assert steps is not None and steps.durations["streamed"] == 1.0, \
        "libvirt 9.0 restored from the FIFO, not from an unpacked file"
    assert [label for label, _ in steps.marks][-3:] == ["defined", "restored", "done"]

    # --disk-only: the same image's disk, booted afresh; the old QEMU ends in order.
    logged = qemu_log.read_text()
    cold = revert(cloud, srv, image_id, "--disk-only")
    assert "terminating on signal 15" in qemu_log.read_text()[len(logged):]
    wait_for_console_line(console_path(cloud, srv), READY_LINE)
    first_line = wait_for_console_line(console_path(cloud, srv), "BBSNAP-COUNTER")
    assert int(first_line.split()[1]) == at_snapshot
    assert mem_counters(cloud, srv)[0] == 1
    assert cold["status"] == "active"

    # A clone boots from the disk alone, with its own identity.
    (clone,) = create_server(cloud, "--memory", "128", image=image_id)
    seed = wait_for_console_line(console_path(cloud, clone["id"]), "BBSNAP-SEED")
    assert f"instance-id={clone['id']}" in seed
    first_line = wait_for_console_line(console_path(cloud, clone["id"]), "BBSNAP-COUNTER")
    assert int(first_line.split()[1]) == at_snapshot


def redefine_ram(hypervisor, server_id: str, mib: int) -> None:
    """Defines *server_id* anew with *mib* MiB of RAM, as an operator editing its XML would
    (the port's define only takes bbsnap's own specs)."""
    xml = ET.fromstring(hypervisor.domain_xml(server_id, inactive=True))
    for tag in ("memory", "currentMemory"):
        element = xml.find(tag)
        assert element is not None
        element.text, element.attrib["unit"] = str(mib), "MiB"
    define_xml(ET.tostring(xml, encoding="unicode"))


def test_refusals_change_nothing(cloud, hypervisor):
    server = booted(cloud)
    srv = server["id"]
    image_id, _, _ = memory_snapshot(cloud, srv)
    other = booted(cloud)

    def unchanged(server_id: str, disk: str) -> None:
        assert state(server_id) == "running"
        assert server_record(cloud, server_id)["disks"] == [disk]
        assert work_files(cloud) == []

    refused = cloud("servers", "revert", other["id"], image_id)
    assert refused.exit_code == 4 and "not a snapshot of server" in refused.stderr
    unchanged(other["id"], other["disks"][0])

    # The server's definition now asks for more RAM: the saved RAM would not fit it.
    redefine_ram(hypervisor, srv, 160)
    refused = cloud("servers", "revert", srv, image_id)
    assert refused.exit_code == 4, refused.stderr
    assert "RAM 128 MiB then, 160 MiB now" in refused.stderr
    unchanged(srv, server["disks"][0])

    # A memory file damaged past its header (so the definition still reads): refused by
    # the whole-file check before the guest is stopped.
    stored = cloud.data_dir / "images" / f"{image_id}.memory.zst"
    good = stored.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    redefine_ram(hypervisor, srv, 128)  # back to the RAM it was saved with
    refused = cloud("servers", "revert", srv, image_id)
    assert refused.exit_code == 1, refused.stderr
    assert f"the memory file of image {image_id}.memory.zst is damaged" in refused.stderr
    unchanged(srv, server["disks"][0])
    stored.write_bytes(good)

    stopped = cloud("servers", "stop", other["id"], "--force")
    assert stopped.exit_code == 0, stopped.stderr
    refused = cloud("servers", "snapshot", other["id"], "--memory")
    assert refused.exit_code == 4 and "needs a running server" in refused.stderr
    assert [i["id"] for i in json.loads(cloud("images", "list", "--format", "json").stdout)
            ] == [cloud.image_id, image_id], "no image was made"


def test_uefi_guest_memory_snapshot_and_revert(cloud, hypervisor, tiny_guest_image):
    imported = cloud("images", "import", str(tiny_guest_image), "--name", "tiny uefi",
                     "--firmware", "uefi")
    assert imported.exit_code == 0, imported.stderr
    server = booted(cloud, "256", image=imported.stdout.strip())  # OVMF needs 256 MiB
    srv = server["id"]
    image_id, before, after = memory_snapshot(cloud, srv)
    wait_until(lambda: last_mem_counter(cloud, srv) > after + 4, 60, "the guest to go on")
    reverted = revert(cloud, srv, image_id)
    assert reverted["firmware"] == "uefi"
    wait_until(lambda: mem_counters(cloud, srv), 60, "the memory counter after the revert")
    assert before < mem_counters(cloud, srv)[0] <= after + 2
    assert READY_LINE not in console_path(cloud, srv).read_text(errors="replace")


def kill_after(cloud, delay: float, *args: str) -> None:
    """Run a bbsnap command as its own process and SIGKILL it after *delay* seconds."""
    process = subprocess.Popen([sys.executable, "-m", "bbsnap.cli.main", *args],
                               env={**os.environ, **cloud.env}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_sigkill_during_the_save_and_the_restore(cloud, hypervisor):
    server = booted(cloud)
    srv = server["id"]
    rng = random.Random(13)
    for _ in range(3):
        kill_after(cloud, rng.uniform(0.3, 1.5), "servers", "snapshot", srv, "--memory")
        listed = cloud("images", "list", "--format", "json")  # runs crash recovery
        assert listed.exit_code == 0, listed.stderr
        for image in json.loads(listed.stdout):
            if image["state"] == "creating":
                wait_settled(cloud, image["id"])
        wait_until(lambda: state(srv) == "running", 60, "the server running again")
        disk = server_record(cloud, srv)["disks"][0]
        assert disk == server["disks"][0] and internal_snapshots(disk) == []
        assert work_files(cloud) == []
        for image in json.loads(cloud("images", "list", "--format", "json").stdout):
            if image["memory_state"]:
                assert image["state"] == "available"
                assert (cloud.data_dir / "images" / f"{image['id']}.memory.zst").is_file()

    image_id, _, _ = memory_snapshot(cloud, srv)
    for _ in range(3):
        kill_after(cloud, rng.uniform(0.2, 2.0), "servers", "revert", srv, image_id)
        shown = cloud("servers", "show", srv, "--format", "json")  # runs crash recovery
        assert shown.exit_code == 0, shown.stderr
        wait_until(lambda: state(srv) == "running", 90, "the server running again")
        disk = server_record(cloud, srv)["disks"][0]
        assert Path(disk).is_file() and disk_counter(disk) >= 0, "a whole disk"
        assert work_files(cloud) == []
        files = sorted(p.name for p in (cloud.data_dir / "servers" / srv).glob("disk*.qcow2"))
        assert files == [Path(disk).name]


def save_in_progress(cloud, process: subprocess.Popen, timeout: float = 60) -> Path:
    """The save's work file (in RAM or in tmp/) once libvirt has begun writing it: its
    header still says ``LibvirtQemudPart`` (libvirt writes ``LibvirtQemudSave`` over it
    when the save ends).
    A file, not libvirt: during the save libvirt 9.0's job query waits behind the save's
    job and then answers "no job" (memory_save_running), and QEMU's monitor, asked through
    libvirt, never showed the migration active."""
    deadline = time.monotonic() + timeout
    while True:
        for path in [*(cloud.data_dir / "tmp").glob("img-*.memory.save"),
                     *(p for p in DataDir(cloud.data_dir).ram_files()
                       if p.name.endswith(".memory.save"))]:
            try:
                with path.open("rb") as header:
                    if header.read(16) == b"LibvirtQemudPart":
                        return path
            except FileNotFoundError:
                pass
        assert process.poll() is None and time.monotonic() < deadline, \
            "the save ended before libvirtd could be restarted"
        time.sleep(0.002)


def test_libvirtd_restarted_during_the_save(cloud, hypervisor):
    """libvirtd restarted while it writes the save file (a 512 MiB guest, for a save of
    about a second): the command resumes the guest on a new connection and fails the
    image (or, should libvirtd finish the save before it stops, the snapshot completes).
    The server runs on its own intact disk, with no internal snapshot, no work file
    and no memory image available without its file; a memory snapshot works again."""
    server = booted(cloud, "512")
    srv, disk = server["id"], server["disks"][0]
    process = subprocess.Popen([sys.executable, "-m", "bbsnap.cli.main", "servers", "snapshot",
                                srv, "--memory"], env={**os.environ, **cloud.env},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        save_in_progress(cloud, process)
        restart_libvirtd()
        hypervisor.close()  # the session's connection died with the daemon
        out, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # Failed (libvirtd cancelled the save) or, if libvirtd finished it before it stopped,
    # done: either way as below.
    assert process.returncode == 0 or "memory" in err, err
    listed = cloud("images", "list", "--format", "json")  # runs crash recovery
    assert listed.exit_code == 0, listed.stderr
    for image in json.loads(listed.stdout):
        if image["state"] == "creating":
            wait_settled(cloud, image["id"])
    for image in json.loads(cloud("images", "list", "--format", "json").stdout):
        assert not image["memory_state"] or (
            image["state"] == "available"
            and (cloud.data_dir / "images" / f"{image['id']}.memory.zst").is_file())
    wait_until(lambda: state(srv) == "running", 60, "the server running again")
    assert server_record(cloud, srv)["disks"] == [disk], "on its own disk"
    assert internal_snapshots(disk) == [] and work_files(cloud) == []
    assert qemu_img.check(Path(disk), force_share=True).corruptions == 0
    counted = last_mem_counter(cloud, srv)
    wait_until(lambda: last_mem_counter(cloud, srv) > counted, 60, "the guest to run on")
    image_id, _, _ = memory_snapshot(cloud, srv)
    assert image_record(cloud, image_id)["memory_state"] is True
