"""Reverting a server to a memory snapshot: the guest continues from the snapshot's instant.

The revert is the rebuild of services/servers.py (a new tracked overlay on the snapshot's
disk, the definition pointed at it, journaled against a SIGKILL); only the last step
differs: instead of booting, the memory image is restored with ``virDomainRestoreFlags``
and a definition whose disk source is that new overlay. Restoring the saved definition
unchanged would make the guest write into the disk file it had at the snapshot, and so
into nothing bbsnap keeps (or worse, into a file the snapshot depends on).

The stored memory file is compressed (memory_file.py, which says why bbsnap and not libvirt
unpacks it), so it is unpacked first into tmp/ (0600, named by this process's job token:
the next command removes one a killed revert left, see ``remove_stale``). It is unpacked
*before* the server is touched: the checks below read its definition, and a refusal
changes nothing.

Refused, each with what differs: another server's memory (the saved UUID is not the
server's), a definition whose machine type, CPU, RAM, vCPUs or device set changed since
(QEMU's migration stream would not load, or would load into the wrong hardware), and host
devices (they cannot be migrated, so not restored).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from bbsnap.errors import ConflictError
from bbsnap.hypervisor import Hardware, Hypervisor, SavedDomain
from bbsnap.state.process_tokens import current_job_token, job_alive
from bbsnap.state.layout import DataDir
from bbsnap.models import Image, Server
from bbsnap.services import memory_file

PREFIX = "restore."
SUFFIX = ".save"
Boot = Callable[[dict[str, Path]], None]  # device -> its new overlay: the server running


def restore_file(data_dir: DataDir, token: str) -> Path:
    return data_dir.tmp_dir / f"{PREFIX}{token}{SUFFIX}"


@contextmanager
def prepared(hv: Hypervisor, data_dir: DataDir, server: Server, image: Image) -> Iterator[Boot]:
    """Unpack and check *image*'s memory for *server*; yields the step that boots the server
    from it onto a new overlay. The unpacked file is removed on the way out."""
    if not image.memory_path:
        raise ConflictError(f"image {image.id} holds no memory state")
    unpacked = restore_file(data_dir, current_job_token())
    try:
        memory_file.unpack(data_dir.image_path(image.memory_path), unpacked)
        check(server, image, hv.saved_domain(unpacked), hv.hardware(server.id))

        def boot(new_disks: dict[str, Path]) -> None:
            hv.restore_memory(unpacked, new_disks)

        yield boot
    finally:
        unpacked.unlink(missing_ok=True)


def check(server: Server, image: Image, saved: SavedDomain, now: Hardware) -> None:
    """Refuse a memory image that is not this server's, or no longer fits its definition."""
    if saved.uuid.lower() != server.uuid.lower():
        raise ConflictError(
            f"image {image.id} holds the memory of another server ({saved.name}), not of "
            f"{server.id}", hint=f"boot it from its disk with 'bbsnap servers create {image.id}'")
    if now.host_devices:
        raise ConflictError(f"server {server.id} has host devices, which cannot be restored "
                            f"with a memory image ({', '.join(now.host_devices)})",
                            hint="revert with --disk-only")
    differences = mismatches(saved.hardware, now)
    if differences:
        raise ConflictError(
            f"the memory snapshot {image.id} no longer matches server {server.id}: "
            + "; ".join(differences), hint="revert with --disk-only to boot from its disk")


def mismatches(saved: Hardware, now: Hardware) -> list[str]:
    """What changed between the hardware a memory image was saved on and the definition now."""
    found = []
    if saved.machine != now.machine:
        found.append(f"machine type {saved.machine} then, {now.machine} now")
    if saved.cpu != now.cpu:
        found.append(f"CPU {saved.cpu} then, {now.cpu} now")
    if saved.memory_kib != now.memory_kib:
        found.append(f"RAM {saved.memory_kib // 1024} MiB then, {now.memory_kib // 1024} MiB now")
    if saved.vcpus != now.vcpus:
        found.append(f"{saved.vcpus} vCPUs then, {now.vcpus} now")
    gone = sorted(set(saved.devices) - set(now.devices))
    added = sorted(set(now.devices) - set(saved.devices))
    if gone or added:
        found.append("devices changed (" + ", ".join(
            [f"removed {d}" for d in gone] + [f"added {d}" for d in added]) + ")")
    return found


def remove_stale(data_dir: DataDir) -> list[Path]:
    """Unpacked memory files of reverts whose process died (libvirtd keeps what it opened)."""
    removed = []
    for path in data_dir.tmp_dir.glob(f"{PREFIX}*{SUFFIX}"):
        token = path.name[len(PREFIX):-len(SUFFIX)]
        if not job_alive(token):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
