"""Turning libvirt domains into bbsnap Servers (and bbsnap facts into domain metadata)."""

from __future__ import annotations

from datetime import datetime

from ..hypervisor import DomainInfo, DomainState, Hypervisor
from ..hypervisor.domain_xml import read_domain_facts
from ..models import Server, ServerStatus

_STATUS = {DomainState.RUNNING: ServerStatus.ACTIVE, DomainState.SHUTOFF: ServerStatus.INACTIVE,
           DomainState.PAUSED: ServerStatus.PAUSED, DomainState.CRASHED: ServerStatus.CRASHED}


def server_from_domain(hv: Hypervisor, info: DomainInfo, *, with_addresses: bool = False,
                       xml: str | None = None) -> Server:
    """*xml*: the domain's live XML when the caller already read it (one libvirt call less)."""
    facts = read_domain_facts(xml if xml is not None else hv.domain_xml(info.name))
    meta = facts.metadata
    created = meta.get("created_at")
    addresses: tuple[str, ...] = ()
    if with_addresses and info.state is DomainState.RUNNING:
        addresses = tuple(hv.addresses(info.name))
    return Server(
        id=info.name, uuid=info.uuid,
        name=meta.get("name") or facts.title or info.name,
        status=_STATUS.get(info.state, ServerStatus.UNKNOWN),
        managed=bool(meta.get("image_id")),
        image_id=meta.get("image_id") or None,
        type_id=meta.get("type_id") or None,
        type_name=meta.get("type_name") or None,
        created_at=datetime.fromisoformat(created) if created else None,
        owner=meta.get("owner") or None,
        accel=meta.get("accel") or None,
        hostname=meta.get("hostname") or None,
        ssh_port=int(meta["ssh_port"]) if meta.get("ssh_port") else None,
        network=meta.get("network") or (facts.networks[0] if facts.networks else None),
        macs=facts.macs, addresses=addresses, disks=facts.disks,
        vcpus=facts.vcpus, memory_mib=facts.memory_mib,
        username=meta.get("username") or None, firmware=facts.firmware,
    )
