"""The checks a memory revert makes before touching the server (pure: no libvirt)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from bbsnap.errors import ConflictError
from bbsnap.hypervisor import Hardware, SavedDomain
from bbsnap.hypervisor.domain_xml import read_hardware
from bbsnap.models import Image, ImageStatus, ImageType, Server, ServerStatus
from bbsnap.services.memory_restore import check, mismatches

XML = """<domain type='qemu'><name>srv-aaaaa</name><uuid>{uuid}</uuid>
<memory unit='KiB'>{kib}</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
<devices><disk type='file' device='disk'><source file='/d.qcow2'/><target dev='vda' bus='virtio'/>
<alias name='virtio-disk0'/></disk>{extra}</devices></domain>"""
UUID = "11111111-2222-3333-4444-555555555555"


def hardware(kib: int = 131072, extra: str = "") -> Hardware:
    return read_hardware(XML.format(uuid=UUID, kib=kib, extra=extra))


def server(uuid: str = UUID) -> Server:
    return Server(id="srv-aaaaa", uuid=uuid, name="dev", status=ServerStatus.ACTIVE, managed=True)


IMAGE = Image(id="img-bbbbb", type=ImageType.SNAPSHOT, owner="local",
              created_at=datetime.now(timezone.utc), status=ImageStatus.AVAILABLE, name="s",
              memory_path="img-bbbbb.memory.zst")


def test_the_same_hardware_passes() -> None:
    assert mismatches(hardware(), hardware()) == []
    check(server(), IMAGE, SavedDomain("srv-aaaaa", UUID, hardware(), {}), hardware())


def test_each_difference_is_named() -> None:
    changed = mismatches(hardware(), hardware(kib=262144, extra="<rng model='virtio'/>"))
    assert changed == ["RAM 128 MiB then, 256 MiB now", "devices changed (added rng virtio)"]


def test_another_servers_memory_is_refused() -> None:
    saved = SavedDomain("srv-other", "99999999-2222-3333-4444-555555555555", hardware(), {})
    with pytest.raises(ConflictError, match="memory of another server"):
        check(server(), IMAGE, saved, hardware())


def test_host_devices_are_refused() -> None:
    now = hardware(extra="<hostdev mode='subsystem' type='pci'/>")
    assert now.host_devices == ("hostdev pci",)
    with pytest.raises(ConflictError, match="host devices"):
        check(server(), IMAGE, SavedDomain("srv-aaaaa", UUID, hardware(), {}), now)
