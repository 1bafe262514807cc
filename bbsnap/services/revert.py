"""Reverting a server to one of its snapshots: which image, and the checks.

A revert *is* a rebuild (services/servers.py) onto one of the server's own snapshots: the
server's history is the catalogue's snapshot images whose ``source_server`` is the server
(snapshots/start.py records the domain's name: ``srv-xxxxx`` for bbsnap's servers), not
deleted, oldest first. Any domain can be reverted, bbsnap's or not (services/server_disks.py
says where a foreign domain's new disks live), and every disk of a multi-disk server at
once. These checks are pure, so the choice and its refusals are tested without libvirt.
"""

from __future__ import annotations

from typing import Callable

from bbsnap.errors import ConflictError
from bbsnap.hypervisor import DiskInfo
from bbsnap.lazy_dataclass import dataclass
from bbsnap.models import Image, ImageStatus, ImageVolume, Server


def choose_snapshot(server: Server, history: list[Image], wanted: str | None,
                    lookup: Callable[[str], Image]) -> Image:
    """The snapshot to revert *server* to: *wanted*, or by default its newest available one.

    *history* is the server's snapshots, oldest first; *lookup* finds any catalogue image
    (raising NotFoundError), so an image that exists but is not in the history is refused
    with the way to use it anyway.
    """
    if wanted is None:
        available = [image for image in history if image.status is ImageStatus.AVAILABLE]
        if not available:
            raise ConflictError(f"server {server.id} has no available snapshot to revert to",
                                hint=f"take one with 'bbsnap servers snapshot {server.id}'")
        return available[-1]
    image = next((i for i in history if i.id == wanted), None)
    if image is None:
        other = lookup(wanted)  # not found: exit 3, as for any unknown image
        raise ConflictError(
            f"image {other.id} is not a snapshot of server {server.id}",
            hint=f"use 'bbsnap servers rebuild {server.id} {other.id}' to give the server a "
                 "disk from another image")
    if image.status is ImageStatus.CREATING:
        raise ConflictError(f"snapshot {image.id} is still being created",
                            hint=f"wait for it ('bbsnap images show {image.id}'), then revert")
    if image.status is not ImageStatus.AVAILABLE:
        raise ConflictError(f"snapshot {image.id} is {image.status.value} and cannot be used")
    return image


@dataclass(frozen=True)
class DiskSource:
    """One disk of a rebuild: the server's disk, and the stored file its new overlay is on."""

    disk: DiskInfo
    stored: str                 # a catalogue path (the image's own, or one of its volumes')
    virtual_size: int


def match_disks(server: Server, writable: list[DiskInfo], image: Image,
                volumes: list[ImageVolume], *, every_disk: bool) -> list[DiskSource]:
    """Which of *server*'s writable disks get a new overlay on which of *image*'s files.

    A snapshot's first file is its first writable disk's; its further volumes are named by
    device. *every_disk* (a revert): each writable disk must have its file, since reverting
    one disk and not the others would mix two instants. A rebuild leaves disks the image
    has no file for as they are.
    """
    if not writable:
        raise ConflictError(f"server {server.id} has no writable file-backed disk")
    if not image.path:
        raise ConflictError(f"image {image.id} has no disk file")
    primary, others = writable[0], writable[1:]
    by_device = {volume.device: volume for volume in volumes}
    server_devices = [d.target for d in writable]
    missing = sorted(set(by_device) - {d.target for d in others})
    uncovered = [d.target for d in others if d.target not in by_device]
    if missing or (every_disk and uncovered):
        image_devices = ", ".join([primary.target] + sorted(by_device))
        raise ConflictError(
            f"image {image.id} has disks for {image_devices} and server {server.id} has "
            f"writable disks {', '.join(server_devices)}: they do not match",
            hint="create a new server from the image with 'bbsnap servers create "
                 f"{image.id}' (it gets every disk of the image)")
    return [DiskSource(primary, image.path, image.virtual_size)] + [
        DiskSource(d, by_device[d.target].path, by_device[d.target].virtual_size)
        for d in others if d.target in by_device]
