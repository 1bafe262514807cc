"""A multi-disk snapshot through a real registry on the real hypervisor: snapshot a running
two-disk domain (the tiny guest on vda, a data disk on vdb), push it to a real
docker-registry on 127.0.0.1, pull it into a fresh data directory and boot a server from the
pulled image: it gets both disks, the guest's counter is the snapshot's and vdb holds what the
data disk held."""

from __future__ import annotations

import subprocess

from tests import registry as fixtures
from tests.conftest import Bbsnap
from tests.system.conftest import (URI, console_path, create_server, image_record,
                                   start_two_disk_domain, wait_for_console_line)
from tests.system.test_snapshots import counter

registry = fixtures.registry
MIB = 1 << 20


def test_two_disk_snapshot_pushed_pulled_and_booted(cloud, hypervisor, domains, registry,
                                                    work_dir, data_dir, tiny_guest_image):
    name = domains.new_name()
    start_two_disk_domain(hypervisor, name, work_dir, tiny_guest_image, "32M")
    taken = cloud("servers", "snapshot", name, "--wait")
    assert taken.exit_code == 0, taken.stderr
    record = image_record(cloud, taken.stdout.strip())
    assert [v["device"] for v in record["volumes"]] == ["vdb"]
    captured = counter(cloud.data_dir / "images" / f"{record['id']}.qcow2")

    ref = f"{registry.host}/system/two-disks:v1"
    pushed = cloud("images", "push", record["id"], ref)
    assert pushed.exit_code == 0, pushed.stderr
    fresh_dir = data_dir.parent / "pulled"
    fresh = Bbsnap(fresh_dir, env={"BBSNAP_ACCEL": "tcg", "LIBVIRT_DEFAULT_URI": URI})
    try:
        pulled = fresh("images", "pull", ref)
        assert pulled.exit_code == 0, pulled.stderr
        top = pulled.stdout.strip()
        (clone,) = create_server(fresh, image=top)
        assert len(clone["disks"]) == 2
        line = wait_for_console_line(console_path(fresh, clone["id"]), "BBSNAP-COUNTER")
        assert int(line.split()[1]) == captured
        raw = work_dir / "vdb.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", clone["disks"][1], str(raw)],
                       check=True)
        with open(raw, "rb") as handle:
            handle.seek(MIB)
            assert handle.read(4096) == b"\x42" * 4096
    finally:
        for info in hypervisor.list_domains():
            if str(fresh_dir) in hypervisor.domain_xml(info.name):
                hypervisor.destroy(info.name)
                hypervisor.undefine(info.name)
