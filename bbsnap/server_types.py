"""The built-in server types (presets of vCPUs, RAM and disk).

Ids are fixed so scripts can rely on them; ``nano`` keeps the seed's ``typ-4nssg``.
Sizes suit a workstation: the smallest boots a cloud image in 256 MiB.
"""

from __future__ import annotations

from bbsnap.errors import NotFoundError
from bbsnap.models import ServerType

SERVER_TYPES: tuple[ServerType, ...] = (
    ServerType("typ-4nssg", "nano", vcpus=1, memory_mib=256, disk_gib=2),
    ServerType("typ-8fjq2", "micro", vcpus=1, memory_mib=512, disk_gib=4),
    ServerType("typ-wz4sk", "small", vcpus=1, memory_mib=1024, disk_gib=10),
    ServerType("typ-m3kr7", "medium", vcpus=2, memory_mib=2048, disk_gib=20),
    ServerType("typ-l9d2c", "large", vcpus=2, memory_mib=4096, disk_gib=40),
)
DEFAULT_TYPE = "nano"


def find_type(key: str) -> ServerType:
    """A type by id or name."""
    for server_type in SERVER_TYPES:
        if key in (server_type.id, server_type.name):
            return server_type
    names = ", ".join(t.name for t in SERVER_TYPES)
    raise NotFoundError(f"server type '{key}' not found", hint=f"known types: {names}")
