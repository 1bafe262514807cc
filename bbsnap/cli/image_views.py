"""How an image looks on screen and as data (one place, so list/show/update agree)."""

from __future__ import annotations

from typing import Any

from bbsnap.models import Dependent, Image, ImageSummary, ImageVolume
from bbsnap.sizes import to_mib

LIST_COLUMNS = ("id", "owner", "type", "created_on", "status", "size", "arch", "name")


def list_row(image: ImageSummary) -> list[Any]:
    return [image.id, image.owner, image.type, image.created_on, image.display_status,
            to_mib(image.virtual_size), image.arch, image.name]


def show_pairs(image: Image, dependents: list[Dependent],
               volumes: list[ImageVolume] | None = None) -> list[tuple[str, Any]]:
    """The seed's fields first (sizes in MiB, minute-precision time), then bbsnap's own."""
    pairs: list[tuple[str, Any]] = [
        ("id", image.id),
        ("type", image.type.value),
        ("owner", image.owner),
        ("created_at", image.created_at.strftime("%Y-%m-%dT%H:%MZ")),
        ("status", image.display_status),
        ("arch", image.arch),
        ("name", image.name),
        ("description", image.description),
        ("virtual_size", to_mib(image.virtual_size)),
        ("disk_size", to_mib(image.disk_size)),
        ("public", _bool(image.visibility.value == "public")),
        ("compatibility_mode", _bool(image.compatibility_mode)),
        ("official", _bool(image.official)),
        ("ancestor_id", image.ancestor_id or ""),
        ("parent_id", image.parent_id or ""),
        ("format", image.format),
        ("username", image.username or ""),
        ("min_ram", image.min_ram if image.min_ram is not None else ""),
        ("checksum", image.checksum or ""),
        ("firmware", image.firmware),
        ("memory_state", _bool(image.memory_state)),
    ]
    if image.source_server:
        pairs.append(("source_server", image.source_server))
    if image.consistency:
        pairs.append(("consistency", image.consistency.value))
    if image.failure_reason:
        pairs.append(("failure_reason", image.failure_reason))
    if image.progress is not None:
        pairs.append(("progress", f"{image.progress}%"))
    if volumes:
        pairs.append(("volumes", ", ".join(f"{v.device} ({to_mib(v.virtual_size)} MiB)"
                                           for v in volumes)))
    if dependents:
        pairs.append(("dependents", ", ".join(d.dependent_id for d in dependents)))
    return pairs


def as_record(image: Image, dependents: list[Dependent] | None = None,
              volumes: list[ImageVolume] | None = None) -> dict[str, Any]:
    """Data for --format json|yaml: sizes in bytes, ISO-8601 times, every key always present."""
    return {
        "id": image.id,
        "type": image.type.value,
        "owner": image.owner,
        "created_at": image.created_at.isoformat(),
        "status": image.display_status,
        "state": image.status.value,
        "public": image.visibility.value == "public",
        "arch": image.arch,
        "name": image.name,
        "description": image.description,
        "virtual_size": image.virtual_size,
        "disk_size": image.disk_size,
        "compatibility_mode": image.compatibility_mode,
        "official": image.official,
        "ancestor_id": image.ancestor_id,
        "parent_id": image.parent_id,
        "format": image.format,
        "username": image.username,
        "min_ram": image.min_ram,
        "checksum": image.checksum,
        "firmware": image.firmware,
        "memory_state": image.memory_state,
        "source_server": image.source_server,
        "consistency": image.consistency.value if image.consistency else None,
        "failure_reason": image.failure_reason,
        "progress": image.progress,
        "dependents": [d.dependent_id for d in dependents or []],
        "volumes": [{"device": v.device, "virtual_size": v.virtual_size, "disk_size": v.disk_size}
                    for v in volumes or []],
    }


def _bool(value: bool) -> str:
    return "true" if value else "false"
