"""How a server looks on screen and as data."""

from __future__ import annotations

from typing import Any

from bbsnap.models import Server

LIST_COLUMNS = ("id", "status", "type", "zone", "created_on", "image_id", "cloud_ips", "name")
ZONE = "local"


def reachable(server: Server) -> list[str]:
    """Where the host reaches the guest: the SSH forward, else the guest's own addresses."""
    if server.ssh_port:
        return [f"127.0.0.1:{server.ssh_port}"]
    return list(server.addresses)


def list_row(server: Server) -> list[Any]:
    return [server.id, server.status.value, server.type_name or "-", ZONE,
            server.created_at.strftime("%Y-%m-%d") if server.created_at else "-",
            server.image_id or "-", ", ".join(reachable(server)) or "-", server.name]


def show_pairs(server: Server, snapshots: list[str] | None = None) -> list[tuple[str, Any]]:
    """*snapshots*: the server's snapshot image ids, oldest first (its history)."""
    pairs: list[tuple[str, Any]] = [
        ("id", server.id),
        ("uuid", server.uuid),
        ("status", server.status.value),
        ("name", server.name),
        ("type", f"{server.type_name} ({server.type_id})" if server.type_id else "-"),
        ("zone", ZONE),
        ("created_at", server.created_at.strftime("%Y-%m-%dT%H:%MZ") if server.created_at else ""),
        ("image_id", server.image_id or ""),
        ("hostname", server.hostname or ""),
        ("vcpus", server.vcpus),
        ("memory", server.memory_mib),
        ("accel", server.accel or ""),
        ("firmware", server.firmware),
        ("network", server.network or ("user" if server.ssh_port else "")),
        ("macs", ", ".join(server.macs)),
        ("private_ips", ", ".join(server.addresses)),
        ("cloud_ips", ", ".join(reachable(server))),
        # The shape `servers ssh` runs: the user after -l is never read as an option.
        ("ssh", f"ssh -l {server.username or 'root'} -p {server.ssh_port} 127.0.0.1"
         if server.ssh_port else ""),
        ("disks", ", ".join(server.disks)),
        ("managed", "true" if server.managed else "false"),
    ]
    if snapshots is not None:
        pairs.append(("snapshots", ", ".join(snapshots)))
    return pairs


def as_record(server: Server, snapshots: list[str] | None = None) -> dict[str, Any]:
    """*snapshots* (show only, where the catalogue is read): image ids, oldest first."""
    record = {
        "id": server.id, "uuid": server.uuid, "status": server.status.value, "name": server.name,
        "type_id": server.type_id, "type": server.type_name, "zone": ZONE,
        "created_at": server.created_at.isoformat() if server.created_at else None,
        "image_id": server.image_id, "hostname": server.hostname, "vcpus": server.vcpus,
        "memory_mib": server.memory_mib, "accel": server.accel, "firmware": server.firmware,
        "network": server.network,
        "macs": list(server.macs), "private_ips": list(server.addresses),
        "cloud_ips": reachable(server), "ssh_port": server.ssh_port,
        "username": server.username, "disks": list(server.disks), "managed": server.managed,
    }
    if snapshots is not None:
        record["snapshots"] = list(snapshots)
    return record
