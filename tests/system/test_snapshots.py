"""Live snapshots under the real libvirtd (TCG), proven with the tiny guest's disk counter.

The guest writes an increasing counter to a fixed sector and flushes each write; a
snapshot must hold the value of the instant it was taken, clones continue from it,
and the original server's disk chain and definition stay exactly as they were.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

from bbsnap.disks import qemu_img
from bbsnap.hypervisor import DiskSpec, DomainSpec, NicSpec
from bbsnap.tinyguest import READY_LINE, read_counter
from tests.system.conftest import (backing_file, console_path, create_server, image_record,
                                   start_two_disk_domain, wait_for_console_line, wait_settled,
                                   wait_until)


def wait_available(cloud, image_id: str) -> dict:
    record = wait_settled(cloud, image_id)
    assert record["state"] == "available", record["failure_reason"]
    return record


def counter(disk: str | Path) -> int:
    value = read_counter(Path(disk))
    return -1 if value is None else value


def chain_of(disk: str) -> list[tuple[str, str | None]]:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--backing-chain",
                                      "--output=json", disk], check=True, capture_output=True,
                                     text=True).stdout)
    return [(layer["filename"], layer.get("backing-filename")) for layer in info]


def test_live_snapshot_holds_the_instant_and_clones_continue_from_it(cloud, hypervisor):
    (server,) = create_server(cloud)
    disk = server["disks"][0]
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    wait_until(lambda: counter(disk) >= 5, 60, "the counter to reach 5")
    chain_before = chain_of(disk)
    xml_before = hypervisor.domain_xml(server["id"], inactive=True)

    before = counter(disk)
    result = cloud("servers", "snapshot", server["id"])
    after = counter(disk)
    assert result.exit_code == 0, result.stderr
    assert f"Snapshotting server {server['id']}" in result.stderr
    image_id = result.stdout.strip()
    creating = image_record(cloud, image_id)
    assert creating["type"] == "snapshot" and creating["ancestor_id"] == cloud.image_id
    assert creating["source_server"] == server["id"]
    assert creating["name"].startswith(f"Snapshot of {server['id']} ")
    assert creating["name"].endswith("(x86_64)")

    record = wait_available(cloud, image_id)
    stored = cloud.data_dir / "images" / f"{image_id}.qcow2"
    captured = counter(stored)
    # The image holds the value at the instant (or the write in flight at that instant).
    assert before <= captured <= after + 1, (before, captured, after)
    wait_until(lambda: counter(disk) > captured + 5, 60, "the live guest to go on counting")

    # A delta on the ancestor (named from images/, where both live), not a full copy; the
    # server's chain and definition untouched.
    assert backing_file(str(stored)) == (f"{cloud.image_id}.qcow2", "qcow2")
    assert record["parent_id"] == cloud.image_id
    assert record["disk_size"] < 4 * 1024 * 1024 and record["consistency"] == "quiesced"
    assert chain_of(disk) == chain_before
    assert hypervisor.domain_xml(server["id"], inactive=True) == xml_before
    assert qemu_img.check(stored).clean
    assert qemu_img.check(Path(disk), force_share=True).corruptions == 0
    assert list((cloud.data_dir / "tmp").iterdir()) == []

    (clone,) = create_server(cloud, image=image_id)
    line = wait_for_console_line(console_path(cloud, clone["id"]), "BBSNAP-COUNTER")
    assert int(line.split()[1]) == captured
    assert clone["id"] != server["id"] and clone["macs"] != server["macs"]
    seed = wait_for_console_line(console_path(cloud, clone["id"]), "BBSNAP-SEED")
    assert f"instance-id={clone['id']}" in seed

    # Delete protection: the clone holds the snapshot, the snapshot holds its ancestor.
    refused = cloud("images", "destroy", image_id)
    assert refused.exit_code == 4 and clone["id"] in refused.stderr
    refused = cloud("images", "destroy", cloud.image_id)
    assert refused.exit_code == 4 and image_id in refused.stderr
    assert cloud("servers", "destroy", clone["id"], server["id"]).exit_code == 0
    assert cloud("images", "destroy", image_id).exit_code == 0
    assert cloud("images", "destroy", cloud.image_id).exit_code == 0


def test_without_quiescing_the_snapshot_is_crash_consistent(cloud, hypervisor):
    (server,) = create_server(cloud)
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    quiesced = cloud("servers", "snapshot", server["id"], "--wait")
    plain = cloud("servers", "snapshot", server["id"], "--no-quiesce", "--wait")
    assert quiesced.exit_code == 0 and plain.exit_code == 0, quiesced.stderr + plain.stderr
    assert image_record(cloud, quiesced.stdout.strip())["consistency"] == "quiesced"
    assert image_record(cloud, plain.stdout.strip())["consistency"] == "crash-consistent"


def test_snapshot_of_a_domain_bbsnap_did_not_make_with_a_raw_disk(cloud, hypervisor, domains,
                                                                  work_dir, tiny_guest_image):
    raw = work_dir / "foreign.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(tiny_guest_image),
                    str(raw)], check=True)
    name = domains.new_name()
    hypervisor.define(DomainSpec(
        name=name, uuid=str(uuid.uuid4()), memory_mib=128, vcpus=1, accel="tcg",
        disks=(DiskSpec(raw, format="raw"),), console_log=work_dir / "console.log",
        nics=(NicSpec("52:54:00:aa:00:01"),), guest_agent=False))
    hypervisor.start(name)
    wait_for_console_line(work_dir / "console.log", READY_LINE)
    wait_until(lambda: read_counter(raw, "raw") is not None and read_counter(raw, "raw") >= 3, 60,
               "the foreign guest to count")

    result = cloud("servers", "snapshot", name, "--wait")
    assert result.exit_code == 0, result.stderr
    image_id = result.stdout.strip()
    record = image_record(cloud, image_id)
    assert record["consistency"] == "crash-consistent", "no agent channel: not quiesced"
    assert record["ancestor_id"] is None and record["source_server"] == name
    stored = cloud.data_dir / "images" / f"{image_id}.qcow2"
    assert "backing-filename" not in json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(stored)], capture_output=True, text=True,
        check=True).stdout)
    captured = counter(stored)
    assert captured >= 3 and hypervisor.disks(name)[0].path == str(raw)

    (clone,) = create_server(cloud, image=image_id)
    line = wait_for_console_line(console_path(cloud, clone["id"]), "BBSNAP-COUNTER")
    assert int(line.split()[1]) == captured
    assert cloud("servers", "destroy", clone["id"]).exit_code == 0


def test_rebuild_reverts_the_disk_and_keeps_the_identity(cloud, hypervisor):
    (server,) = create_server(cloud, "-n", "dev box")
    disk = server["disks"][0]
    console = console_path(cloud, server["id"])
    wait_for_console_line(console, READY_LINE)
    result = cloud("servers", "snapshot", server["id"], "--wait")
    assert result.exit_code == 0, result.stderr
    image_id = result.stdout.strip()
    captured = counter(cloud.data_dir / "images" / f"{image_id}.qcow2")
    wait_until(lambda: counter(disk) > captured + 10, 60, "writes after the snapshot")

    rebuilt = cloud("servers", "rebuild", server["id"], image_id, "--format", "json")
    assert rebuilt.exit_code == 0, rebuilt.stderr
    (after,) = json.loads(rebuilt.stdout)
    assert (after["id"], after["name"], after["macs"], after["uuid"]) == (
        server["id"], "dev box", server["macs"], server["uuid"])
    assert after["image_id"] == image_id and after["status"] == "active"
    line = wait_for_console_line(console, "BBSNAP-COUNTER")
    assert int(line.split()[1]) == captured, "the writes after the snapshot are gone"
    assert backing_file(after["disks"][0])[0].endswith(f"{image_id}.qcow2")
    assert not Path(disk).exists(), "the old overlay is removed"
    refused = cloud("images", "destroy", image_id)
    assert refused.exit_code == 4 and server["id"] in refused.stderr


def test_snapshot_of_a_stopped_server(cloud, hypervisor):
    (server,) = create_server(cloud)
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    wait_until(lambda: counter(server["disks"][0]) >= 3, 60, "the counter")
    assert cloud("servers", "stop", server["id"]).exit_code == 0
    on_disk = counter(server["disks"][0])
    result = cloud("servers", "snapshot", server["id"], "--wait")
    assert result.exit_code == 0, result.stderr
    record = image_record(cloud, result.stdout.strip())
    stored = cloud.data_dir / "images" / f"{record['id']}.qcow2"
    assert counter(stored) == on_disk and record["disk_size"] < 4 * 1024 * 1024
    assert backing_file(str(stored))[0].endswith(f"{cloud.image_id}.qcow2")


def test_multi_disk_server_is_captured_whole_and_cloned_whole(cloud, hypervisor, domains,
                                                              work_dir, tiny_guest_image):
    name = domains.new_name()
    start_two_disk_domain(hypervisor, name, work_dir, tiny_guest_image, "64M")

    result = cloud("servers", "snapshot", name, "--wait")
    assert result.exit_code == 0, result.stderr
    record = image_record(cloud, result.stdout.strip())
    assert [v["device"] for v in record["volumes"]] == ["vdb"]
    assert record["volumes"][0]["virtual_size"] == 64 * 1024 * 1024

    (clone,) = create_server(cloud, "--no-start", image=record["id"])
    assert len(clone["disks"]) == 2
    raw = work_dir / "vdb.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", clone["disks"][1], str(raw)], check=True)
    with open(raw, "rb") as handle:
        handle.seek(1024 * 1024)
        assert handle.read(4096) == b"\x42" * 4096
    assert cloud("servers", "destroy", clone["id"]).exit_code == 0
    assert cloud("images", "destroy", record["id"]).exit_code == 0
    assert list((cloud.data_dir / "images").glob(f"{record['id']}*")) == []
