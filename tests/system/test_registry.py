"""The registry round trip on the real hypervisor: snapshot the running tiny guest twice,
push the second snapshot (its chain: the imported image, both snapshots) to a real
docker-registry on 127.0.0.1, pull it into a fresh data directory, and boot a server from
the pulled snapshot: its disk counter is the one the snapshot captured."""

from __future__ import annotations

import json
import sqlite3

from bbsnap.tinyguest import READY_LINE
from tests import registry as fixtures
from tests.conftest import Bbsnap
from tests.system.conftest import (URI, console_path, create_server, wait_for_console_line,
                                   wait_settled, wait_until)
from tests.system.test_snapshots import counter

registry = fixtures.registry


def snapshot(cloud, server_id: str) -> str:
    result = cloud("servers", "snapshot", server_id)
    assert result.exit_code == 0, result.stderr
    image_id = result.stdout.strip()
    record = wait_settled(cloud, image_id)
    assert record["state"] == "available", record["failure_reason"]
    return image_id


def test_snapshot_pushed_pulled_into_a_fresh_data_dir_boots(cloud, hypervisor, registry,
                                                           data_dir):
    (server,) = create_server(cloud)
    disk = server["disks"][0]
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    wait_until(lambda: counter(disk) >= 3, 60, "the counter to reach 3")
    first = snapshot(cloud, server["id"])
    wait_until(lambda: counter(disk) >= counter(cloud.data_dir / "images" / f"{first}.qcow2")
               + 3, 60, "the counter to go on")
    second = snapshot(cloud, server["id"])
    captured = counter(cloud.data_dir / "images" / f"{second}.qcow2")
    assert captured > counter(cloud.data_dir / "images" / f"{first}.qcow2")

    ref = f"{registry.host}/system/tiny:snap2"
    pushed = cloud("images", "push", second, ref)
    assert pushed.exit_code == 0, pushed.stderr
    assert pushed.stderr.count("uploaded (") == 3  # the image and both snapshots

    fresh_dir = data_dir.parent / "pulled"
    fresh = Bbsnap(fresh_dir, env={"BBSNAP_ACCEL": "tcg", "LIBVIRT_DEFAULT_URI": URI})
    try:
        pulled = fresh("images", "pull", ref, "--name", "pulled snapshot")
        assert pulled.exit_code == 0, pulled.stderr
        top = pulled.stdout.strip()
        shown = json.loads(fresh("images", "show", top, "--format", "json").stdout)
        assert shown["name"] == "pulled snapshot" and shown["type"] == "snapshot"
        with sqlite3.connect(fresh_dir / "catalogue.sqlite3") as db:
            assert db.execute("SELECT count(*) FROM images WHERE status = 'available'"
                              ).fetchone()[0] == 3
        (clone,) = create_server(fresh, image=top)
        line = wait_for_console_line(console_path(fresh, clone["id"]), "BBSNAP-COUNTER")
        assert int(line.split()[1]) == captured
    finally:
        for info in hypervisor.list_domains():
            if str(fresh_dir) in hypervisor.domain_xml(info.name):
                hypervisor.destroy(info.name)
                hypervisor.undefine(info.name)
