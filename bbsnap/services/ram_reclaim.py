"""Orphaned raw memory saves in RAM (DataDir.ram_dir), which `doctor` reports and `--fix` deletes.

A memory snapshot's raw save file lives in /dev/shm/bbsnap-UID for the second or two until
its worker has compressed it into images/; every path bbsnap foresaw removes it with its
image (DataDir.remove_image_files). One left by a path nobody foresaw (the image's row gone,
the image no longer `creating`) would hold a guest's memory in RAM until the host reboots.

A file of this data directory (its name carries the directory's tag: ram_file) is an orphan
when no catalogue row names the image id it names, or that image is not `creating`, or it
is creating with its job token dead and no snapshot job for crash recovery to hand to a new
worker (which needs the file: memory.store). That is reclaim.py's rule for tmp/ with crash
recovery's adoption added, as these files cannot be quarantined and undone. An empty
catalogue, or one that could not be opened, proves nothing (as for image files); a name that
names no image id says nothing about whose it is: both are undecidable, never deleted.

Orphans are deleted, never quarantined: they are guest memory (secrets: keys, passwords),
which a quarantine would write onto disk, and a rename cannot leave tmpfs anyway.

ram_dir is read only while it is a directory of ours nobody else can enter, through the
descriptor layout.opened_ram_dir judged that on (opened without following a symlink: what
is listed and deleted is in the directory that was checked); DataDir.trusted_ram_dir and
ensure_ram_dir decide through the same helper. doctor never creates it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from bbsnap.errors import BbsnapError, NotFoundError
from bbsnap.lazy_dataclass import dataclass
from bbsnap.models import ImageFilter, ImageStatus
from bbsnap.services.reclaim import Orphan, Undecidable
from bbsnap.state.catalogue import Catalogue
from bbsnap.state.layout import DataDir, opened_ram_dir
from bbsnap.state.process_tokens import job_alive

# img-xxxxx.memory.save (memory.py), img-xxxxx.vda.copy.qcow2 (snapshots/targets.py)
_IMAGE_ID = re.compile(r"^(img-[0-9a-z]{5})(?:[.-]|$)")


@dataclass(frozen=True)
class RamSurvey:
    directory: Path
    orphans: list[Orphan]
    undecidable: list[Undecidable]
    refused: str = ""  # why the directory was not read ("" if it was, or does not exist)


def survey(data_dir: DataDir, catalogue: Catalogue | None, *, qemu: bool = False) -> RamSurvey:
    """This data directory's files in ram_dir (or, *qemu*, in qemu_ram_dir: full copies
    QEMU writes there, services/snapshots/targets.py), sorted into orphans and undecidable
    files.

    The files are listed before the catalogue is read: a snapshot commits its row (creating,
    with its live job's token, and its snapshot job) before libvirt writes its save file, so
    every file seen here belongs to a row read afterwards, never to a row not yet written."""
    directory, group = _place(data_dir, qemu)
    with opened_ram_dir(directory, group) as (fd, refused):
        files = _listing(data_dir, directory, fd) if fd is not None else []
    orphans: list[Orphan] = []
    undecidable: list[Undecidable] = []
    if not files:
        return RamSurvey(directory, orphans, undecidable, refused)
    kept, unknown = _verdicts(catalogue, {image_id for _, _, image_id in files if image_id})
    proves_nothing = bool(unknown) and _proves_nothing(catalogue)
    for path, size, image_id in files:
        if image_id is None:
            undecidable.append(Undecidable(path, size, "its name names no image: nothing "
                                                       "says whose it is"))
        elif image_id in kept:
            continue  # a live job's save file, or one crash recovery hands to a new worker
        elif image_id in unknown and proves_nothing:
            undecidable.append(Undecidable(path, size, "the catalogue is empty or could not "
                                                       "be opened: it proves nothing"))
        else:
            orphans.append(Orphan(path, size))
    return RamSurvey(directory, orphans, undecidable, refused)


def _place(data_dir: DataDir, qemu: bool) -> tuple[Path, int | None]:
    """The directory and the group that may enter it (QEMU's, for qemu_ram_dir)."""
    if qemu:
        return data_dir.qemu_ram_dir, data_dir.qemu_gid()
    return data_dir.ram_dir, None


def remove(data_dir: DataDir, orphans: list[Orphan]) -> list[Orphan]:
    """Delete *orphans* (survey's, all in ram_dir) outright; the ones deleted. Guest memory
    is never moved onto disk to be reclaimed later (see the module's docstring)."""
    removed: list[Orphan] = []
    for qemu in (False, True):
        directory, group = _place(data_dir, qemu)
        with opened_ram_dir(directory, group) as (fd, _refused):
            if fd is None:
                continue
            for orphan in orphans:
                if orphan.path.parent != directory or \
                        not orphan.path.name.startswith(data_dir.ram_prefix):
                    continue  # not this data directory's file in there: never ours to delete
                try:
                    os.unlink(orphan.path.name, dir_fd=fd)
                except FileNotFoundError:
                    continue  # its worker ended it meanwhile
                except OSError as exc:
                    raise BbsnapError(f"cannot delete {orphan.path}: {exc.strerror}") from exc
                removed.append(orphan)
    return removed


def _listing(data_dir: DataDir, directory: Path, fd: int) -> list[tuple[Path, int, str | None]]:
    """This data directory's entries in the opened *directory* (another data directory's
    tag is never listed): each path, the bytes it holds in RAM, and the image id its name
    names."""
    found = []
    prefix = data_dir.ram_prefix
    with os.scandir(fd) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False):
                    continue  # bbsnap makes no directories here: not ours to judge
            except OSError:
                continue  # gone meanwhile
            match = _IMAGE_ID.match(entry.name[len(prefix):])
            found.append((directory / entry.name, info.st_blocks * 512,
                          match.group(1) if match else None))
    return sorted(found)


def _verdicts(catalogue: Catalogue | None, image_ids: set[str]) -> tuple[set[str], set[str]]:
    """Of *image_ids*: those whose file must be kept, and those no catalogue row names."""
    kept: set[str] = set()
    unknown: set[str] = set()
    for image_id in image_ids:
        try:
            if catalogue is None:
                raise NotFoundError(image_id)
            image = catalogue.get(image_id, include_deleted=True)
        except NotFoundError:
            unknown.add(image_id)
            continue
        if image.status is not ImageStatus.CREATING:
            continue
        # crash recovery (services/recovery.py) gives a creating image with a snapshot job
        # whose process is gone to a new worker, which stores this file: not an orphan
        if job_alive(image.job) or catalogue.snapshot_job(image_id) is not None:
            kept.add(image_id)
    return kept, unknown


def _proves_nothing(catalogue: Catalogue | None) -> bool:
    """Whether a missing row proves nothing: no catalogue, or one without a single row (a
    lost WAL, a restored empty file)."""
    return catalogue is None or not catalogue.find(ImageFilter(include_deleted=True))
