"""Reverting a server to one of its snapshots: which image, and the checks.

A revert *is* a rebuild (services/servers.py) onto one of the server's own snapshots: the
server's history is the catalogue's snapshot images whose ``source_server`` is the server
(snapshot.py records the domain's name: ``srv-xxxxx`` for bbsnap's servers), not deleted,
oldest first. These checks are pure, so the choice and its refusals are tested without
libvirt.
"""

from __future__ import annotations

from typing import Callable

from bbsnap.errors import ConflictError
from bbsnap.models import Image, ImageStatus, Server


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


def check_revertible(server: Server, writable_disks: int, image_volumes: int) -> None:
    """Refuse what a one-disk rebuild cannot revert faithfully."""
    if not server.managed:
        # Its disk lives wherever its owner put it: bbsnap keeps new overlays only in its
        # servers' own directories, and never deletes another tool's disk.
        raise ConflictError(
            f"{server.id} was not created by bbsnap; bbsnap reverts only its own servers",
            hint="create a bbsnap server from the snapshot with 'bbsnap servers create IMG'")
    if writable_disks != 1 or image_volumes > 1:
        # Reverting one disk and not the others would mix two instants.
        raise ConflictError(
            f"server {server.id} has {writable_disks} writable disks; bbsnap reverts only "
            "single-disk servers",
            hint="create a new server from the snapshot with 'bbsnap servers create IMG' "
                 "(it gets every disk of the snapshot)")
