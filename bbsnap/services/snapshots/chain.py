"""Snapshot chains: each snapshot of a running server copies only what changed since the
previous one, and is stored as a delta on it.

The backup that takes snapshot N is incremental from snapshot N-1's checkpoint and creates
checkpoint N at the same instant (``backupBegin`` with a checkpoint XML); its copy holds
only the clusters written in between, so with N-1's file named as its backing file it *is*
the disk at N's instant. The chain starts from the bitmap a bbsnap server's disk was born
with (``bbsnap-since-create``, services/snapshots/change_tracking.py; snapshot 1 is stored on the
server's image) or, for a domain bbsnap did not create, from a full copy that creates
checkpoint 1.

A checkpoint is trusted only when it is provably about this disk: the newest available
snapshot recorded it (catalogue ``chain_links``) for the same domain, device and disk file
(path and inode: a replaced file differs), and libvirt still has it. libvirt itself refuses
an incremental backup whose bitmap is missing from the disk or inconsistent (QEMU killed
without storing it): then bbsnap's checkpoints of that domain are given up and the copy is
full (snapshot.py). Raw disks cannot hold a bitmap: full copies, noted.

bbsnap's checkpoints are named ``bbsnap-<image id>`` (and ``bbsnap-since-create``); other
tools' checkpoints on the same domain are never deleted. Superseded ones of bbsnap's are
deleted once the next snapshot is available, so a failed snapshot leaves the chain able to
continue from the last good one. Past ``max_chain_depth`` files, a snapshot is stored on the
server's image again (incremental from the disk's birth bitmap where there is one, else a
full copy), so no image ever needs more than that many files to open.
"""

from __future__ import annotations

import os
from pathlib import Path

from bbsnap.lazy_dataclass import dataclass
from bbsnap.state.catalogue import Catalogue
from bbsnap.errors import BbsnapError
from bbsnap.hypervisor import DiskInfo, Hypervisor
from bbsnap.state.layout import DataDir
from bbsnap.models import ChainLink, Image
from bbsnap.services.snapshots import change_tracking

PREFIX = "bbsnap-img-"  # bbsnap's chain checkpoints: PREFIX + the snapshot's image id suffix


def checkpoint_name(image_id: str) -> str:
    """``img-abcde`` -> ``bbsnap-img-abcde``."""
    return f"bbsnap-{image_id}"


def is_ours(checkpoint: str) -> bool:
    return checkpoint.startswith(PREFIX) or checkpoint == change_tracking.CHECKPOINT


@dataclass(frozen=True)
class ChainPlan:
    since: str | None           # the checkpoint the copy is incremental from; None: full copy
    parent: Image | None        # the image the snapshot is stored on; None: standalone
    checkpoint: str | None      # the checkpoint the snapshot's instant creates; None: no chain
    note: str | None = None     # why the copy is full, for the user

    @property
    def incremental(self) -> bool:
        return self.since is not None


@dataclass(frozen=True)
class ServerDisk:
    """What the plan needs to know about the server and its one disk."""

    domain: str
    domain_uuid: str
    disk: DiskInfo
    directory: Path             # the server's directory (services/server_disks.py)


class ChainPlanner:
    def __init__(self, catalogue: Catalogue, data_dir: DataDir, hypervisor: Hypervisor,
                 max_depth: int) -> None:
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._hv = hypervisor
        self._max_depth = max_depth

    def plan(self, image_id: str, server: ServerDisk, ancestor: Image | None) -> ChainPlan:
        """How snapshot *image_id* of a running single-disk server is copied and stored."""
        disk = server.disk
        if disk.format != "qcow2":
            return ChainPlan(None, ancestor, None,
                             f"{disk.target} is a {disk.format} disk, which cannot record "
                             "what changed; copying the whole disk")
        checkpoint = checkpoint_name(image_id)
        head, why_not = self._trusted_head(server)
        too_deep = None
        if head is not None:
            length = self._catalogue.chain_length(head[0].id) + 1
            if length <= self._max_depth:
                return ChainPlan(head[1].checkpoint, head[0], checkpoint)
            too_deep = why_not = (
                f"a delta on {head[0].id} would need {length} files to open (more than "
                f"max_chain_depth {self._max_depth}); storing it on the server's image")
        birth = self._birth_bitmap(server, ancestor)
        if birth is not None:
            # Silent after a rebuild (a new disk, so a new chain): only the bound is news.
            return ChainPlan(birth, ancestor, checkpoint, too_deep)
        return ChainPlan(None, ancestor, checkpoint,
                         f"{why_not}; copying the whole disk" if why_not else None)

    def _trusted_head(self, server: ServerDisk) -> tuple[tuple[Image, ChainLink] | None,
                                                         str | None]:
        """The newest snapshot whose checkpoint is provably about this disk, or why not."""
        found = self._catalogue.chain_head(server.domain_uuid)
        if found is None:
            return None, None
        image, link = found
        disk = server.disk
        if (link.device, link.disk_path) != (disk.target, disk.path) or \
                link.disk_identity != disk_identity(Path(disk.path)):
            return None, f"the disk {disk.target} is not the one snapshot {image.id} was taken of"
        if not image.path or not self._data_dir.image_path(image.path).is_file():
            return None, f"the file of snapshot {image.id} is missing"
        if not self._hv.has_checkpoint(server.domain, link.checkpoint):
            return None, f"libvirt no longer has checkpoint {link.checkpoint}"
        return found, None

    def _birth_bitmap(self, server: ServerDisk, ancestor: Image | None) -> str | None:
        """The bitmap a bbsnap server's disk was born with, if it still describes a delta on
        the server's image (and that image leaves room for one more file)."""
        if ancestor is None or not ancestor.path:
            return None
        ancestor_file = self._data_dir.image_path(ancestor.path)
        if not change_tracking.usable(server.directory, [server.disk], ancestor_file):
            return None
        change_tracking.ensure_registered(self._hv, server.domain, server.disk.target)
        return change_tracking.CHECKPOINT

    def link(self, image_id: str, server: ServerDisk, plan: ChainPlan) -> ChainLink | None:
        """The record of the checkpoint *plan* makes, for the catalogue."""
        if plan.checkpoint is None:
            return None
        return ChainLink(image_id=image_id, domain_uuid=server.domain_uuid,
                         checkpoint=plan.checkpoint, device=server.disk.target,
                         disk_path=server.disk.path,
                         disk_identity=disk_identity(Path(server.disk.path)))


def disk_identity(path: Path) -> str:
    """Which file *path* is: a disk replaced by another file (copy, restore) is another one."""
    try:
        found = os.stat(path)
    except OSError:
        return ""
    return f"{found.st_dev}:{found.st_ino}"


def give_up(hv: Hypervisor, directory: Path, domain: str) -> None:
    """The domain's bitmaps can't be trusted any more (QEMU died without storing them):
    forget bbsnap's checkpoints of it, and the disk's birth bitmap (*directory*: the
    server's)."""
    change_tracking.give_up(hv, directory, domain)
    for name in hv.checkpoints(domain):
        if name.startswith(PREFIX):
            hv.delete_checkpoint(domain, name)


def prune(hv: Hypervisor, domain: str, keep: str) -> None:
    """Delete bbsnap's chain checkpoints of *domain* other than *keep* (the newest snapshot's)
    and the birth bitmap (flattening needs it); other tools' are left alone. Best effort: a
    checkpoint left behind costs a bitmap, and the next snapshot prunes again."""
    try:
        for name in hv.checkpoints(domain):
            if name.startswith(PREFIX) and name != keep:
                hv.delete_checkpoint(domain, name)
    except BbsnapError:
        pass


def forget(hv: Hypervisor, domain: str, checkpoint: str) -> None:
    """Best effort: the checkpoint of a failed or destroyed snapshot (the chain goes on from
    the previous one, or starts again). A domain that is gone took its checkpoints along."""
    if not checkpoint.startswith(PREFIX):
        return  # never anybody else's, whatever a catalogue row says
    try:
        hv.delete_checkpoint(domain, checkpoint)
    except BbsnapError:
        pass
