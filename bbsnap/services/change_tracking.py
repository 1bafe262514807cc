"""Changed-block tracking for bbsnap's own servers: a snapshot copies only what the guest wrote.

A server's disk starts as an empty overlay on a catalogue image. A persistent dirty
bitmap added to that overlay before anything opens it records every cluster written
from then on (QEMU, and any QEMU tool that opens the overlay read-write, keep it up to
date), and a libvirt checkpoint redefined over that bitmap lets a push-mode backup copy
only those clusters (``<incremental>``). Rebased onto the image the server was built
from, that copy *is* the snapshot's delta: no full copy of the disk, no compare.

libvirt 9.0 refuses to create a checkpoint of an inactive domain but accepts the
redefinition of one whose bitmap already exists, which is what ``register`` does. If
QEMU dies without storing the bitmap (a crash, SIGKILL), QEMU marks it inconsistent and
libvirt refuses the incremental backup; the snapshot then drops the checkpoint and makes
a full copy (services/snapshot.py). Tracking is used only where it is provably complete:
the disk was tracked from its creation and still has the image as its backing file.
"""

from __future__ import annotations

from pathlib import Path

from ..disks import qemu_img
from ..hypervisor import DiskInfo, Hypervisor

CHECKPOINT = "bbsnap-since-create"  # the checkpoint's and its bitmap's name


def start(overlay: Path) -> None:
    """Begin recording writes to a new, still empty overlay (before any guest opens it)."""
    qemu_img.add_bitmap(overlay, CHECKPOINT)


def register(hv: Hypervisor, domain: str, device: str) -> None:
    """Make the overlay's bitmap known to libvirt as the domain's checkpoint."""
    hv.redefine_checkpoint(domain, CHECKPOINT, device)


def forget(hv: Hypervisor, domain: str) -> None:
    hv.delete_checkpoint(domain, CHECKPOINT)


def usable(hv: Hypervisor, domain: str, disks: list[DiskInfo], ancestor_file: Path) -> bool:
    """Whether a snapshot of *domain* may copy only the tracked clusters of its one disk."""
    if len(disks) != 1:
        return False  # multi-disk servers keep the full copy, so all disks share one instant
    disk = disks[0]
    if disk.format != "qcow2" or disk.backing is None:
        return False
    if Path(disk.backing).resolve() != ancestor_file.resolve():
        return False  # re-based by someone else: the bitmap no longer describes a delta on it
    return hv.has_checkpoint(domain, CHECKPOINT)
