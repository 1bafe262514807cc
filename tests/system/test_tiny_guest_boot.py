"""The tiny guest, imported into the catalogue, boots from its disk under the real
libvirtd (TCG) and does what tests rely on: ready line, counter, agent, seed line."""

from __future__ import annotations

import json
import uuid

from bbsnap.disks import qemu_img
from bbsnap.hypervisor import DiskSpec, DomainSpec, DomainState, NicSpec
from bbsnap.tinyguest import READY_LINE, read_counter
from tests.system.conftest import wait_for_console_line, wait_until


def test_catalogue_image_of_the_tiny_guest_boots_under_libvirt(bbsnap, work_dir, hypervisor,
                                                                tiny_guest_image, domains):
    imported = bbsnap("images", "import", str(tiny_guest_image), "--name", "tiny guest")
    assert imported.exit_code == 0, imported.stderr
    image = json.loads(bbsnap("images", "show", imported.stdout.strip(), "--format", "json").stdout)
    image_file = bbsnap.data_dir / "images" / f"{image['id']}.qcow2"

    overlay = work_dir / "disk.qcow2"
    qemu_img.create_overlay(overlay, image_file)
    console = work_dir / "console.log"
    name = domains.new_name()
    spec = DomainSpec(name=name, uuid=str(uuid.uuid4()), memory_mib=128, vcpus=1, accel="tcg",
                      disks=(DiskSpec(overlay),), console_log=console, title="tiny <test> & co",
                      nics=(NicSpec(mac="52:54:00:12:34:56"),),
                      metadata={"image_id": image["id"]})
    hypervisor.define(spec)
    assert hypervisor.facts(name).metadata == {"image_id": image["id"]}

    started = hypervisor.start(name)
    assert started.state is DomainState.RUNNING
    wait_for_console_line(console, READY_LINE)
    log = console.read_text(errors="replace")
    assert "BBSNAP-SEED none" in log
    assert "BBSNAP-AGENT started" in log

    first = wait_until(lambda: read_counter(overlay), 60, "the guest's first counter write")
    wait_until(lambda: (read_counter(overlay) or 0) > first + 2, 60, "the counter to advance")
    assert read_counter(image_file) is None, "the guest wrote into the catalogue image"

    hypervisor.destroy(name)
    hypervisor.undefine(name)
    assert name not in {d.name for d in hypervisor.list_domains()}
    assert qemu_img.check(overlay).clean
