"""Download and upload: a snapshot of the running tiny guest, exported as raw+gzip,
imported again (standing in for another host), boots with the same disk content."""

from __future__ import annotations

import gzip
import subprocess

from bbsnap.tinyguest import READY_LINE, read_counter
from tests.system.conftest import (console_path, create_server, image_record,
                                   wait_for_console_line)


def test_snapshot_export_import_boot_round_trip(cloud, hypervisor, work_dir):
    (server,) = create_server(cloud)
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    snap = cloud("servers", "snapshot", server["id"], "--wait")
    assert snap.exit_code == 0, snap.stderr
    image_id = snap.stdout.strip()
    stored = cloud.data_dir / "images" / f"{image_id}.qcow2"
    captured = read_counter(stored)

    out = work_dir / f"{image_id}.gz"
    exported = cloud("images", "export", image_id, "-o", str(out))
    assert exported.exit_code == 0, exported.stderr
    raw = work_dir / "exported.raw"
    raw.write_bytes(gzip.decompress(out.read_bytes()))
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw),
                              str(stored)], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr

    imported = cloud("images", "import", str(out), "--name", "from download")
    assert imported.exit_code == 0, imported.stderr
    new_id = imported.stdout.strip()
    record = image_record(cloud, new_id)
    assert record["type"] == "upload" and record["ancestor_id"] is None
    assert record["virtual_size"] == image_record(cloud, image_id)["virtual_size"]

    (clone,) = create_server(cloud, image=new_id)
    line = wait_for_console_line(console_path(cloud, clone["id"]), "BBSNAP-COUNTER")
    assert int(line.split()[1]) == captured
    wait_for_console_line(console_path(cloud, clone["id"]), READY_LINE)
    assert cloud("servers", "destroy", clone["id"], server["id"]).exit_code == 0
