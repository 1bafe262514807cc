"""`servers prune` and `schedule run` on a real chain while servers run on it: a clone runs on the middle
snapshot and another on the newest; the original server keeps running and snapshotting.
Every remaining image keeps exactly its content (`qemu-img compare` with copies made before),
the clone's base is kept, the rest merged; the running QEMUs keep the old files (their
inodes, deleted now) and, restarted, open the merged chain and still see their data.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from bbsnap.tinyguest import COUNTER_PREFIX, READY_LINE, read_counter
from tests.system.conftest import (console_path, create_server, image_record, wait_for_console_line,
                                   write_into_running_disk)
from tests.system.test_snapshot_chains import MIB, chained_snapshot, jobs, stored  # noqa: F401

# What each snapshot adds on top of the previous one: (qemu-io pattern, offset in MiB).
WRITES = ((0x11, 512), (0x22, 768), (0x33, 1024), (0x44, 1280))
LENGTH_MIB = 16


def shows(disk: Path, pattern: int, offset_mib: int) -> bool:
    """Whether *disk* (through its whole chain, as QEMU opens it) holds *pattern* there."""
    done = subprocess.run(["qemu-io", "-U", "-r", "-f", "qcow2", "-c",
                           f"read -P {pattern:#x} {offset_mib}M {LENGTH_MIB}M", str(disk)],
                          capture_output=True, text=True, check=False)
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout


def same_content(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", str(a),
                           str(b)], capture_output=True, check=False).returncode == 0


def open_by_qemu(domain: str) -> list[str]:
    """The files the domain's QEMU process holds open (deleted ones end in "(deleted)")."""
    pid = Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip()
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found.append(os.readlink(fd))
        except OSError:
            continue
    return found


def restart_and_read_counter(cloud, server_id: str, disk: Path) -> None:
    """Power the server off and on (a new QEMU opens the chain again): it boots and counts
    on from the value its disk holds."""
    assert cloud("servers", "stop", "--force", server_id).exit_code == 0
    value = read_counter(disk)
    assert value is not None
    log = console_path(cloud, server_id)
    log.unlink()  # libvirt starts it again (append="off"): only the new boot's lines
    assert cloud("servers", "start", server_id).exit_code == 0
    line = wait_for_console_line(log, COUNTER_PREFIX.strip())
    assert int(line.split()[1]) == value


def test_prune_in_the_middle_of_a_chain_while_servers_run_on_it(cloud, jobs):  # noqa: F811
    (server,) = create_server(cloud)
    disk = server["disks"][0]
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    snaps = []
    for pattern, offset in WRITES:
        write_into_running_disk(server["id"], f"write -P {pattern:#x} {offset}M {LENGTH_MIB}M")
        snaps.append(chained_snapshot(cloud, jobs, server["id"], disk)[0])
    s1, s2, s3, s4 = snaps
    assert [s["parent_id"] for s in snaps] == [cloud.image_id, s1["id"], s2["id"], s3["id"]]

    # A clone on the middle snapshot, another on the newest, both running.
    (middle,) = create_server(cloud, image=s2["id"])
    (newest,) = create_server(cloud, image=s4["id"])
    for clone in (middle, newest):
        wait_for_console_line(console_path(cloud, clone["id"]), READY_LINE)
    refs = {}
    for snap in (s2, s4):
        refs[snap["id"]] = cloud.data_dir.parent / f"{snap['id']}.ref.qcow2"
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2",
                        str(stored(cloud, snap)), str(refs[snap["id"]])], check=True)

    dry = cloud("servers", "prune", server["id"], "--keep-last", "1", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "would remove" in dry.stdout and stored(cloud, s1).exists()

    result = cloud("servers", "prune", server["id"], "--keep-last", "1", "--format", "json")
    assert result.exit_code == 0, result.stderr
    decided = {d["id"]: d for d in json.loads(result.stdout)}
    assert decided[s4["id"]]["action"] == "keep"
    assert decided[s2["id"]]["action"] == "keep"
    assert decided[s2["id"]]["reasons"] == [f"base of server {middle['id']}"]
    assert decided[s1["id"]] == {**decided[s1["id"]], "action": "removed",
                                 "merged_into": [s2["id"]]}
    assert decided[s3["id"]]["action"] == "removed"
    assert decided[s3["id"]]["merged_into"] == [s4["id"]]

    # The kept images show exactly what they did; their files are stored on what is left.
    for snap in (s2, s4):
        assert same_content(stored(cloud, snap), refs[snap["id"]]), snap["id"]
    assert image_record(cloud, s2["id"])["parent_id"] == cloud.image_id
    assert image_record(cloud, s4["id"])["parent_id"] == s2["id"]
    assert not stored(cloud, s1).exists() and not stored(cloud, s3).exists()
    assert cloud("images", "show", s1["id"]).exit_code == 3
    # Removed snapshots' data lives on in the merged files.
    middle_disk, newest_disk = Path(middle["disks"][0]), Path(newest["disks"][0])
    assert shows(middle_disk, 0x11, 512) and shows(middle_disk, 0x22, 768)
    assert not shows(middle_disk, 0x33, 1024)
    for pattern, offset in WRITES:
        assert shows(newest_disk, pattern, offset)

    # The running clones still hold the old files (nothing they had open was rewritten).
    assert any(f.startswith(str(stored(cloud, s1))) and f.endswith("(deleted)")
               for f in open_by_qemu(middle["id"]))
    assert any(f.startswith(str(stored(cloud, s3))) and f.endswith("(deleted)")
               for f in open_by_qemu(newest["id"]))

    # The chain goes on from the newest snapshot's checkpoint: a small incremental copy.
    write_into_running_disk(server["id"], f"write -P 0x55 1536M {LENGTH_MIB}M")
    s5, to_copy, stderr = chained_snapshot(cloud, jobs, server["id"], disk)
    assert s5["parent_id"] == s4["id"] and "copying the whole disk" not in stderr
    assert LENGTH_MIB * MIB <= to_copy < (LENGTH_MIB + 8) * MIB, to_copy

    # Restarted, each clone opens the merged chain and sees the same data.
    for clone, clone_disk in ((middle, middle_disk), (newest, newest_disk)):
        restart_and_read_counter(cloud, clone["id"], clone_disk)
        held = open_by_qemu(clone["id"])
        assert not any(f.endswith("(deleted)") and "/images/" in f for f in held), held
    assert shows(middle_disk, 0x11, 512) and shows(newest_disk, 0x33, 1024)
    for snap in (s2, s4):
        assert same_content(stored(cloud, snap), refs[snap["id"]]), snap["id"]


def test_schedule_run_snapshots_and_prunes_a_due_server_and_skips_one_not_due(cloud, jobs):  # noqa: F811
    from datetime import timedelta

    from bbsnap.state.catalogue import Catalogue, utcnow
    from bbsnap.models import Schedule

    (server,) = create_server(cloud)
    disk = server["disks"][0]
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    older = []
    for pattern, offset in WRITES[:2]:
        write_into_running_disk(server["id"], f"write -P {pattern:#x} {offset}M {LENGTH_MIB}M")
        older.append(chained_snapshot(cloud, jobs, server["id"], disk)[0])
    made = cloud("servers", "schedule", server["id"], "--every", "1h", "--keep-last", "2",
                 "--no-quiesce")
    assert made.exit_code == 0, made.stderr
    # Its last run two hours ago (due), and a server whose last run was just now (not due),
    # through the catalogue's own API rather than waiting.
    catalogue = Catalogue(cloud.data_dir / "catalogue.sqlite3")
    (entry,) = catalogue.schedules()
    catalogue.mark_schedule_run(entry.server_uuid, utcnow() - timedelta(hours=2), "done")
    catalogue.set_schedule(Schedule(server_uuid="0c0c0c0c-0000-4000-8000-000000000001",
                                    server="srv-later", every_seconds=3600,
                                    retention={"last": 1}, quiesce=True,
                                    created_at=utcnow() - timedelta(days=1),
                                    last_run=utcnow() - timedelta(minutes=5)))
    catalogue.close()
    kept_ref = cloud.data_dir.parent / "kept.ref.qcow2"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2",
                    str(stored(cloud, older[1])), str(kept_ref)], check=True)

    ran = cloud("schedule", "run")
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    lines = dict(line.split(": ", 1) for line in ran.stdout.splitlines())
    assert lines["srv-later"].startswith("not due")
    done = lines[server["id"]]
    assert done.startswith("done: snapshot img-") and "removed 1" in done, done
    new_id = done.split()[2].rstrip(",")
    new = image_record(cloud, new_id)
    assert new["state"] == "available" and new["parent_id"] == older[1]["id"]
    assert cloud("images", "show", older[0]["id"]).exit_code == 3  # pruned, merged
    assert image_record(cloud, older[1]["id"])["parent_id"] == cloud.image_id
    assert same_content(stored(cloud, older[1]), kept_ref)
    assert shows(stored(cloud, older[1]), 0x11, 512)  # the pruned one's data, merged

    again = cloud("schedule", "run")  # idempotent: nothing is due now
    assert again.exit_code == 0 and "done" not in again.stdout, again.stdout
    listed = cloud("schedule", "list")
    assert server["id"] in listed.stdout and "last=2" in listed.stdout
