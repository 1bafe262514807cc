"""Changed-block tracking for bbsnap's own servers: a snapshot copies only what the guest wrote.

A server's disk starts as an empty overlay on a catalogue image. A persistent dirty
bitmap in that overlay from its birth records every cluster written since (QEMU, and
any QEMU tool that opens the overlay read-write, keep it up to date), and a libvirt
checkpoint over that bitmap lets a push-mode backup copy only those clusters
(``<incremental>``). Rebased onto the image the server was built from, that copy *is*
the snapshot's delta: no full copy of the disk, no compare.

Costs kept off the paths that must be fast:
- ``servers create`` copies a blank overlay (made once per image and disk size, bitmap
  included) instead of running ``qemu-img create`` and ``qemu-img bitmap``;
- the libvirt checkpoint (a redefinition: libvirt 9.0 won't *create* one for an inactive
  domain, but redefines one whose bitmap exists; ~12 ms) is recorded by the first snapshot.

Tracking is used only where it is provably complete: the server directory's marker says
the disk was born with the bitmap, the server has that one disk, and the disk still has
the image as its backing file. If QEMU died without storing the bitmap (a crash,
SIGKILL), QEMU marks it inconsistent and libvirt refuses the incremental backup; the
snapshot then gives tracking up for that disk (checkpoint and marker removed) and makes
a full copy (services/snapshots/start.py). A rebuild gives the server a new tracked disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from bbsnap import safe_files
from bbsnap.disks import qemu_img
from bbsnap.hypervisor import DiskInfo, Hypervisor
from bbsnap.state.process_tokens import current_job_token
from bbsnap.state.layout import DataDir

CHECKPOINT = "bbsnap-since-create"  # the checkpoint's and its bitmap's name
MARKER = "disk-tracked"  # in the server's directory: its disk was born with the bitmap


def new_tracked_overlay(data_dir: DataDir, image_id: str, image_file: Path, size: int,
                        dest: Path) -> None:
    """A new, empty overlay on *image_file* at *dest* (a new file: 0600, what a guest
    writes is its own) that records every write from now on."""
    blank = data_dir.blank_overlay(image_id, size)
    if not blank.exists():
        # Named by its maker's job token: doctor leaves it alone while that process lives.
        making = blank.with_name(f".{blank.name}.{current_job_token()}")
        try:
            qemu_img.create_overlay(making, image_file, size=size)
            qemu_img.add_bitmap(making, CHECKPOINT)
            os.replace(making, blank)  # concurrent creates each make one; either is right
        finally:
            making.unlink(missing_ok=True)
    safe_files.copy_sparse(blank, dest)  # not shutil: it imports bz2 and lzma (~2 ms)
    (dest.parent / MARKER).write_text(f"{dest.name}\n")


def usable(directory: Path, disks: list[DiskInfo], ancestor_file: Path) -> bool:
    """Whether a snapshot may copy only the tracked clusters of the server's one disk
    (*directory*: the server's, services/server_disks.py)."""
    if len(disks) != 1:
        return False  # multi-disk servers keep the full copy of every disk at one instant
    disk = disks[0]
    if disk.format != "qcow2" or disk.backing is None:
        return False
    if Path(disk.backing).resolve() != ancestor_file.resolve():
        return False  # re-based by someone else: the bitmap no longer describes a delta on it
    marker = directory / MARKER
    try:
        return marker.read_text().strip() == Path(disk.path).name
    except OSError:
        return False


def ensure_registered(hv: Hypervisor, domain: str, device: str) -> None:
    """Make the disk's bitmap known to libvirt as the domain's checkpoint (once)."""
    if not hv.has_checkpoint(domain, CHECKPOINT):
        hv.redefine_checkpoint(domain, CHECKPOINT, device)


def give_up(hv: Hypervisor, directory: Path, domain: str) -> None:
    """The bitmap can't be trusted any more: its snapshots make full copies from now on."""
    (directory / MARKER).unlink(missing_ok=True)
    hv.delete_checkpoint(domain, CHECKPOINT)
