"""Private files under the real libvirtd: a guest boots from 0600 images in 0710 directories,
is snapshotted live, a clone boots from the snapshot, and another local user reads none of it.

Before, images and snapshots were 0644 in 0755 directories: `nobody` read the guest's
counter out of a snapshot with qemu-io.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from bbsnap.tinyguest import READY_LINE, read_counter
from tests.other_user import as_nobody
from tests.system.conftest import (console_path, create_server, wait_for_console_line,
                                   wait_settled, wait_until)


def _qemu_groups(domain: str) -> set[int]:
    """The supplementary groups of the domain's QEMU process."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"qemu-system" not in cmdline[0] or f"guest={domain},".encode() not in \
                    b" ".join(cmdline):
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        line = next(x for x in status.splitlines() if x.startswith("Groups:"))
        return {int(g) for g in line.split()[1:]}
    raise AssertionError(f"no QEMU process for {domain}")


def test_guest_boots_snapshots_and_clones_while_others_read_nothing(cloud, hypervisor):
    data = cloud.data_dir
    (server,) = create_server(cloud)
    disk = Path(server["disks"][0])
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    wait_until(lambda: (read_counter(disk) or 0) >= 3, 60, "the counter to reach 3")
    # QEMU gets in through the directories' group, not through "others".
    assert os.stat(data / "images").st_gid in _qemu_groups(server["id"])

    result = cloud("servers", "snapshot", server["id"])
    assert result.exit_code == 0, result.stderr
    image_id = result.stdout.strip()
    record = wait_settled(cloud, image_id)
    assert record["state"] == "available", record["failure_reason"]
    snapshot = data / "images" / f"{image_id}.qcow2"
    captured = read_counter(snapshot)
    assert captured is not None and captured >= 3

    # The snapshot (0600, a delta on the 0600 imported image) boots a clone that sees it.
    (clone,) = create_server(cloud, image=image_id)
    line = wait_for_console_line(console_path(cloud, clone["id"]), "BBSNAP-COUNTER")
    assert int(line.split()[1]) == captured

    server_dir = data / "servers" / server["id"]
    files = [data / "catalogue.sqlite3", data / "images" / f"{cloud.image_id}.qcow2", snapshot,
             server_dir / "disk.qcow2", server_dir / "seed.iso", server_dir / "console.log",
             data / "locks" / f"{hypervisor.info(server['id']).uuid}.lock",
             data / "servers" / ".allocate.lock", data / "logs" / f"{image_id}.log"]
    files += [p for p in (data / "catalogue.sqlite3-wal", data / "catalogue.sqlite3-shm")
              if p.exists()]
    dirs = [data, data / "images", data / "servers", server_dir, data / "tmp", data / "locks",
            data / "logs", data / "blank-overlays"]
    for path in files + dirs:
        mode = os.stat(path).st_mode
        assert not mode & 0o007, f"{path} is {stat.filemode(mode)}"
    verdicts = as_nobody(files + dirs)
    assert all(v == "denied" for v in verdicts.values()), verdicts

    lock_file = data / "locks" / f"{hypervisor.info(server['id']).uuid}.lock"
    assert cloud("servers", "destroy", clone["id"], server["id"]).exit_code == 0
    assert not lock_file.exists(), "destroy removes the server's lock file"
