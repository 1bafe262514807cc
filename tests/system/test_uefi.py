"""UEFI images: servers boot through OVMF under the real libvirtd (TCG), find their NoCloud
seed, and keep their firmware through snapshot, clone and export; their NVRAM store goes
with them.

The tiny guest's disk boots both ways (syslinux for BIOS, a unified kernel image at the
removable-media path for UEFI), so importing it with `--firmware uefi` makes a UEFI image.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from bbsnap.tinyguest import READY_LINE
from tests.system.conftest import console_path, image_record, wait_for_console_line


def boot(cloud, image_id: str) -> dict:
    """A server from *image_id* at the type's memory (no --memory), booted and seeded."""
    created = cloud("servers", "create", image_id, "--format", "json")
    assert created.exit_code == 0, created.stderr
    (server,) = json.loads(created.stdout)
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    seed = wait_for_console_line(console_path(cloud, server["id"]), "BBSNAP-SEED")
    assert f"instance-id={server['id']}" in seed  # OVMF left the seed's CD-ROM usable
    return server


def nvram_of(hypervisor, server_id: str) -> Path:
    os_el = ET.fromstring(hypervisor.domain_xml(server_id)).find("os")
    assert os_el is not None
    loader, nvram = os_el.find("loader"), os_el.find("nvram")
    assert loader is not None and loader.get("type") == "pflash", "booted through OVMF"
    assert nvram is not None and nvram.text
    return Path(nvram.text)


def test_a_uefi_image_boots_snapshots_and_clones_as_uefi(cloud, hypervisor, tiny_guest_image,
                                                         work_dir):
    imported = cloud("images", "import", str(tiny_guest_image), "--name", "tiny uefi",
                     "--firmware", "uefi")
    assert imported.exit_code == 0, imported.stderr
    image_id = imported.stdout.strip()
    assert image_record(cloud, image_id)["firmware"] == "uefi"
    too_small = cloud("servers", "create", image_id, "--memory", "128")
    assert too_small.exit_code == 2 and "too little for a UEFI guest" in too_small.stderr
    assert list((cloud.data_dir / "servers").iterdir()) == []  # nothing was made

    server = boot(cloud, image_id)
    assert server["firmware"] == "uefi"
    assert server["memory_mib"] == 256  # the type's 128 MiB is raised for OVMF
    store = nvram_of(hypervisor, server["id"])
    assert store.is_file()

    snapshot = cloud("servers", "snapshot", server["id"], "--wait")
    assert snapshot.exit_code == 0, snapshot.stderr
    snapshot_id = snapshot.stdout.strip()
    assert image_record(cloud, snapshot_id)["firmware"] == "uefi"  # read from the domain

    clone = boot(cloud, snapshot_id)
    clone_store = nvram_of(hypervisor, clone["id"])
    assert clone_store != store and clone_store.is_file()

    # A BIOS image's disk would not boot in the UEFI server's definition.
    refused = cloud("servers", "rebuild", clone["id"], cloud.image_id)
    assert refused.exit_code == 4 and "boots with bios" in refused.stderr, refused.stderr
    assert nvram_of(hypervisor, clone["id"]) == clone_store

    # Download and import again: the sidecar carries the firmware.
    exported = work_dir / "uefi.raw.gz"
    result = cloud("images", "export", snapshot_id, "-o", str(exported))
    assert result.exit_code == 0, result.stderr
    again = cloud("images", "import", str(exported))
    assert again.exit_code == 0, again.stderr
    assert image_record(cloud, again.stdout.strip())["firmware"] == "uefi"

    assert cloud("servers", "destroy", clone["id"], server["id"]).exit_code == 0
    assert not store.exists() and not clone_store.exists()
