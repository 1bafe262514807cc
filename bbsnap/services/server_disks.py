"""Where a server's bbsnap-made disks live, and which catalogue image they stand on.

A bbsnap server keeps its disks in ``servers/srv-xxxxx/`` and names its image in its
domain's metadata. A domain bbsnap did not create (virt-manager's, virsh's) gets disks from
bbsnap only when it is reverted to one of its snapshots. They live in
``servers/dom-<uuid>/`` (by UUID: a domain's name may be any text), with an ``origin.json``
as a bbsnap server's directory has, so `doctor` knows whose they are.

Nothing but the disk sources changes in such a domain's definition: no bbsnap metadata, so it
stays the user's domain (bbsnap does not destroy it, and never deletes the disk it came
with). Which image its disk stands on is therefore read from the disk itself: a file in that
directory whose backing file is a catalogue image's file.
"""

from __future__ import annotations

from pathlib import Path

from bbsnap import ids
from bbsnap.disks import qemu_img
from bbsnap.errors import BbsnapError
from bbsnap.hypervisor import DiskInfo
from bbsnap.models import Server
from bbsnap.state.layout import DataDir


def directory(data_dir: DataDir, server: Server) -> Path:
    """The directory that holds the disks bbsnap made for *server*."""
    if server.managed:
        return data_dir.server_dir(server.id)
    return data_dir.domain_dir(server.uuid)


def base_image_id(data_dir: DataDir, server: Server, disk: DiskInfo) -> str | None:
    """The catalogue image *server*'s disk *disk* is an overlay on, if bbsnap made it."""
    if server.managed:
        return server.image_id
    path = Path(disk.path)
    if disk.format != "qcow2" or path.parent != data_dir.domain_dir(server.uuid):
        return None  # the user's own disk: whatever it stands on is not bbsnap's to say
    backing = disk.backing
    if backing is None:  # an inactive definition shows no backing chain: ask the file
        try:
            backing = qemu_img.info(path, "qcow2", force_share=True).backing_file
        except BbsnapError:
            return None
    if backing is None or Path(backing).parent != data_dir.images_dir:
        return None
    image_id = Path(backing).name.removesuffix(".qcow2")
    return image_id if ids.is_valid(image_id, "img") else None
