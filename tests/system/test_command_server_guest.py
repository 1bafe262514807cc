"""The command server's commands on the real hypervisor path: a running guest snapshotted
and cloned through the server (libvirt imported in the server, connected in each fork; the
snapshot's worker forked from the fork), as the same commands do in their own processes."""

from __future__ import annotations

import json
from pathlib import Path

from bbsnap.tinyguest import READY_LINE
from tests.command_server import started
from tests.system.conftest import (console_path, create_server, image_record, wait_for_console_line,
                                   wait_settled)


def test_snapshot_and_clone_through_the_command_server(cloud, hypervisor, tmp_path: Path) -> None:
    (server,) = create_server(cloud)
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    with started(cloud, runtime) as srv:
        before = srv.served()
        snap = srv.entry("servers", "snapshot", server["id"])
        assert snap.returncode == 0, snap.stderr
        image_id = snap.stdout.decode().strip()
        assert wait_settled(cloud, image_id)["state"] != "failed"
        assert image_record(cloud, image_id)["state"] == "available"
        clone = srv.entry("servers", "create", image_id, "--memory", "128", "--format", "json")
        assert clone.returncode == 0, clone.stderr
        (made,) = json.loads(clone.stdout)
        assert srv.served() == before + 3  # the snapshot, the clone, this question
    wait_for_console_line(console_path(cloud, made["id"]), READY_LINE)
    assert made["uuid"] != server["uuid"] and made["id"] != server["id"]
    for srv_id in (made["id"], server["id"]):
        assert cloud("servers", "destroy", srv_id).exit_code == 0
    assert cloud("images", "destroy", image_id).exit_code == 0
