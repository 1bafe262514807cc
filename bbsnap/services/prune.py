"""`servers prune`: remove a server's snapshots outside a retention policy, merging each
removed snapshot's data into the later snapshots stored on it.

A snapshot P whose child C (``parent_id`` = P, the same server's) is stored on it is removed
by writing C anew onto P's parent (or standalone when P has none): a copy of C beside it in
images/, safely rebased (``qemu-img rebase`` reads both chains and writes into the copy the
clusters where they differ), checked, and renamed over C. The rename is the commit point.
A running QEMU whose chain includes C keeps C's old inode, which still names P, whose inode
it keeps open too: it reads exactly what it read before, and nothing it has open is written.
After its restart it opens C' on P's parent. Then P's row, file and checkpoint go the way
`images destroy` removes them.

Snapshots that a server or another image (not one of this server's later snapshots) uses as
its base are kept and named. The newest snapshot is always kept: the next snapshot is
incremental from its checkpoint.

Crash safety: each merge is journaled in tmp/ (``prune.TOKEN.journal``) before the copy
exists; recovery (every command, once the prune's process is dead) removes a copy that was
not renamed yet (C and P untouched), or, when the rename happened, records C's new parent.
P itself is removed by the next prune.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import field
from pathlib import Path

from bbsnap import safe_files
from bbsnap.lazy_dataclass import dataclass
from bbsnap.state import locks
from bbsnap.state.catalogue import Catalogue
from bbsnap.disks import qemu_img
from bbsnap.errors import BbsnapError, CataloguePathError
from bbsnap.hypervisor import Hypervisor
from bbsnap.state.process_tokens import current_job_token, job_alive
from bbsnap.state.layout import FILE_MODE, DataDir
from bbsnap.models import DependentKind, Image, ImageFilter, ImageType
from bbsnap.reporting import SILENT, Reporter
from bbsnap.services import stored_chain
from bbsnap.services.images import ImageService
from bbsnap.services.retention import Dated, Policy, select

JOURNAL_PREFIX = "prune."
JOURNAL_SUFFIX = ".journal"
MERGE_SUFFIX = ".merge"


class MergeFailed(BbsnapError):
    """A merged file could not be written or failed its check; nothing was changed."""


@dataclass
class Decision:
    image: Image
    keep: bool
    reasons: list[str] = field(default_factory=list)   # rules keeping it, or why it is a base
    merged_into: list[str] = field(default_factory=list)  # children rewritten without it


@dataclass
class PruneReport:
    server: str
    dry_run: bool
    decisions: list[Decision]  # newest first

    @property
    def removed(self) -> list[Decision]:
        return [d for d in self.decisions if not d.keep]


class PruneService:
    def __init__(self, catalogue: Catalogue, data_dir: DataDir, hypervisor: Hypervisor,
                 images: ImageService, reporter: Reporter = SILENT) -> None:
        self._reporter = reporter
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._hv = hypervisor
        self._images = images

    def prune(self, server: str, policy: Policy, *, dry_run: bool = False) -> PruneReport:
        policy.require_rule()
        info = self._hv.info(server)
        # The server's lock: no snapshot copy of it runs (its worker holds the lock until
        # the image is available), so its chain does not grow while we rewrite it.
        with locks.acquire(self._data_dir.locks_dir, info.uuid,
                           on_wait=lambda: self._reporter.waiting(f"another operation on {server}"),
                           timeout=self._data_dir.lock_timeout,
                           purpose=f"prune of {info.name}"):
            snapshots = self.snapshots_of(info.name)
            selection = select([Dated(i.id, i.created_at) for i in snapshots], policy)
            by_id = {i.id: i for i in snapshots}
            decisions = {i.id: Decision(i, i.id in selection.keep,
                                        list(selection.keep.get(i.id, [])))
                         for i in snapshots}
            # Oldest first: a removed snapshot's children may be removed later themselves.
            for image_id in reversed(selection.remove):
                decision = decisions[image_id]
                bases = self._used_as_base_by(by_id[image_id], info.name)
                if bases:
                    decision.keep = True
                    decision.reasons = [f"base of {name}" for name in bases]
                    continue
                decision.merged_into = [c.id for c in self._children(image_id, info.name)]
                if not dry_run:
                    self._remove(self._catalogue.get(image_id), info.name)
            ordered = sorted(decisions.values(),
                             key=lambda d: (d.image.created_at, d.image.id), reverse=True)
            return PruneReport(info.name, dry_run, ordered)

    def snapshots_of(self, server: str) -> list[Image]:
        """The server's available snapshots (oldest first)."""
        return [i for i in self._catalogue.find(ImageFilter(type=ImageType.SNAPSHOT,
                                                            status="available"))
                if i.source_server == server]

    def _children(self, image_id: str, server: str) -> list[Image]:
        """This server's snapshots stored on *image_id* (prune rewrites them without it)."""
        return [i for i in self.snapshots_of(server) if i.parent_id == image_id]

    def _used_as_base_by(self, image: Image, server: str) -> list[str]:
        """What keeps *image*: servers on it, images on it other than the server's snapshots."""
        children = {c.id for c in self._children(image.id, server)}
        return [f"{d.kind.value} {d.dependent_id}" for d in self._catalogue.dependents(image.id)
                if d.kind is DependentKind.SERVER or d.dependent_id not in children]

    def _remove(self, pruned: Image, server: str) -> None:
        for child in self._children(pruned.id, server):
            merge(self._catalogue, self._data_dir, child, pruned)
        # The row refuses (atomically) if anything came to depend on it meanwhile.
        self._images.destroy(pruned.id)


def merge(catalogue: Catalogue, data_dir: DataDir, child: Image, pruned: Image) -> Image:
    """Rewrite *child* so that it no longer needs *pruned* (its parent): same content, stored
    on *pruned*'s parent or standalone; published by rename, journaled for recovery."""
    if not child.path or not pruned.path:
        raise MergeFailed(f"image {child.id} or {pruned.id} has no file")
    images_dir = data_dir.images_dir
    child_file = data_dir.image_path(child.path)
    # Every file the rebase will read must be a stored image (a header is data).
    stored_chain.require_inside(data_dir, child.id, child_file)
    new_parent = catalogue.get(pruned.parent_id) if pruned.parent_id else None
    parent_file = data_dir.image_path(new_parent.path) if new_parent and new_parent.path \
        else None
    if new_parent is not None and parent_file is None:
        raise MergeFailed(f"image {new_parent.id} has no file")
    with safe_files.OutputDir(images_dir) as directory:
        temp_name = directory.temp_name(child_file.name, MERGE_SUFFIX)
    temp = images_dir / temp_name
    journal = data_dir.tmp_dir / f"{JOURNAL_PREFIX}{current_job_token()}{JOURNAL_SUFFIX}"
    safe_files.write_atomic(journal, json.dumps({
        "child": child.id, "pruned": pruned.id, "pruned_file": Path(pruned.path).name,
        "new_parent": new_parent.id if new_parent else None, "temp": temp_name}).encode())
    try:
        if parent_file is None:
            # No parent to store it on: the copy holds all of what the child shows.
            qemu_img.convert(child_file, "qcow2", temp, "qcow2")
        else:
            # A copy beside the child names the same (relative) backing file; the safe
            # rebase writes into it exactly the clusters where the old and new chains differ.
            shutil.copyfile(child_file, temp)
            qemu_img.rebase(temp, parent_file)
            qemu_img.set_backing(temp, parent_file, relative=True)
        verdict = qemu_img.check(temp)
        if verdict.corruptions:
            raise MergeFailed(f"the merged copy of {child.id} is corrupt "
                              f"({verdict.corruptions} errors)")
        safe_files.publish(temp, child_file, mode=FILE_MODE)  # the commit point
    except BaseException:
        temp.unlink(missing_ok=True)
        journal.unlink(missing_ok=True)
        raise
    size = qemu_img.info(child_file, "qcow2").actual_size
    merged = catalogue.reparent(child.id, new_parent.id if new_parent else None,
                                disk_size=size)
    journal.unlink(missing_ok=True)
    return merged


def recover_interrupted_prunes(catalogue: Catalogue, data_dir: DataDir) -> list[str]:
    """Finish the record of merges whose prune died: a copy not yet renamed is removed (its
    child and parent were never touched); a renamed one gets its new parent recorded.
    Returns the ids of the children looked at."""
    done = []
    for journal in data_dir.tmp_dir.glob(f"{JOURNAL_PREFIX}*{JOURNAL_SUFFIX}"):
        token = journal.name[len(JOURNAL_PREFIX):-len(JOURNAL_SUFFIX)]
        if job_alive(token):
            continue
        try:
            entry = json.loads(journal.read_text())
            temp = data_dir.images_dir / Path(str(entry["temp"])).name
            child = catalogue.get(str(entry["child"]))
        except (OSError, ValueError, KeyError, TypeError, BbsnapError):
            journal.unlink(missing_ok=True)
            continue
        temp.unlink(missing_ok=True)
        if child.parent_id == entry["pruned"] and child.path:
            try:
                child_file = data_dir.image_path(child.path)
                found = qemu_img.info(child_file, "qcow2", force_share=True)
            except (BbsnapError, CataloguePathError):
                found = None  # unreadable: leave the record as it was
            if found is not None and found.backing_file != entry["pruned_file"]:
                # The rename happened: the file is already the merged one.
                catalogue.reparent(child.id, entry["new_parent"], disk_size=found.actual_size)
        done.append(child.id)
        journal.unlink(missing_ok=True)
    return done


def live_work_files(data_dir: DataDir) -> set[Path]:
    """The journals of prunes still running and the merge copies they name: `doctor --fix`
    must not take them for orphans (a dead prune's are crash recovery's to remove)."""
    found: set[Path] = set()
    for journal in data_dir.tmp_dir.glob(f"{JOURNAL_PREFIX}*{JOURNAL_SUFFIX}"):
        if not job_alive(journal.name[len(JOURNAL_PREFIX):-len(JOURNAL_SUFFIX)]):
            continue
        found.add(journal)
        try:
            found.add(data_dir.images_dir / Path(str(json.loads(journal.read_text())["temp"])).name)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return found
