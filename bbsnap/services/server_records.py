"""Turning libvirt domains into bbsnap Servers (and bbsnap facts into domain metadata).

The metadata is read from any domain on the connection, and anyone who can define a domain
can write it: a field that does not parse (``ssh_port`` "22x", a bad date) is treated as not
known, so one odd domain never breaks ``servers list`` or ``show`` for everyone.
"""

from __future__ import annotations

import re
from datetime import datetime

from bbsnap.errors import UsageError
from bbsnap.hypervisor import DomainFacts, DomainInfo, DomainState, Hypervisor
from bbsnap.models import Server, ServerStatus

_STATUS = {DomainState.RUNNING: ServerStatus.ACTIVE, DomainState.SHUTOFF: ServerStatus.INACTIVE,
           DomainState.PAUSED: ServerStatus.PAUSED, DomainState.CRASHED: ServerStatus.CRASHED}

MAX_SERVER_NAME = 255
# What a domain's XML cannot carry: XML 1.0 has no C0 controls but tab, newline and CR, no
# U+FFFE/U+FFFF and no lone surrogates (libvirt refuses the definition, printing its whole
# XML). CR is refused too: XML parsers read it back as a newline, so it would not be kept.
_NOT_IN_XML = re.compile("[\x00-\x08\x0b-\x1f\ud800-\udfff\ufffe\uffff]")


def check_server_name(name: str) -> str:
    """A server name is free text stored verbatim (in the domain's metadata and, one line,
    its title), so only what XML cannot hold is refused, before anything is created."""
    if not name.strip():
        raise UsageError("a server name must not be empty")
    if len(name) > MAX_SERVER_NAME:
        raise UsageError(f"a server name must be at most {MAX_SERVER_NAME} characters")
    bad = _NOT_IN_XML.search(name)
    if bad:
        raise UsageError(f"a server name cannot contain {ascii(bad.group())[1:-1]}: the "
                         "domain's XML cannot hold it",
                         hint="tabs and newlines are kept, other control characters are not")
    return name


def server_from_domain(hv: Hypervisor, info: DomainInfo, *, with_addresses: bool = False,
                       facts: DomainFacts | None = None) -> Server:
    """*facts*: the domain's live facts when the caller already read them (one libvirt call
    less)."""
    facts = facts if facts is not None else hv.facts(info.name)
    meta = facts.metadata
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
        created_at=_time(meta.get("created_at")),
        owner=meta.get("owner") or None,
        accel=meta.get("accel") or None,
        hostname=meta.get("hostname") or None,
        ssh_port=_port(meta.get("ssh_port")),
        network=meta.get("network") or (facts.networks[0] if facts.networks else None),
        macs=facts.macs, addresses=addresses, disks=facts.disks,
        vcpus=facts.vcpus, memory_mib=facts.memory_mib,
        username=meta.get("username") or None, firmware=facts.firmware,
    )


def _port(text: str | None) -> int | None:
    """A TCP port, or None for anything else ("22x", "0", "70000", " 22", "²²")."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def _time(text: str | None) -> datetime | None:
    """An ISO-8601 time, or None when it does not parse."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        return None
