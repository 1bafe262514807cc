"""What `doctor --fix` may reclaim, and the quarantine it reclaims into (DESIGN §8).

A file is an orphan only when something proves nobody uses it: a catalogue with rows that
names no such image, no live job working on it, and, for a server directory, the libvirt
connection it was made on (its origin record) answering without its domain. Everything
else that looks unused is *undecidable*: kept, and reported with the reason. An empty
catalogue (a lost WAL, a restored empty file) or another connection proves nothing.

Reclaimed files are moved (renamed: same filesystem) into ``DATA/quarantine/<UTC time>/``
under their path in the data directory; a later `doctor --fix` deletes a batch once it is
older than QUARANTINE_GRACE, so a wrong verdict can still be undone by moving it back.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from bbsnap.lazy_dataclass import dataclass
from bbsnap.state.catalogue import Catalogue
from bbsnap.errors import BbsnapError
from bbsnap.hypervisor import DomainInfo
from bbsnap.state.process_tokens import job_alive
from bbsnap.state.layout import DOMAIN_DIR_PREFIX, DataDir
from bbsnap.models import ImageFilter, ImageStatus
from bbsnap.services import prune
from bbsnap.services.server_origin import read_origin

QUARANTINE_GRACE = timedelta(days=7)
QUARANTINE_DIR_MODE = 0o700  # reclaimed disks are as private as they were
_ID_PREFIX = re.compile(r"^(img-[0-9a-z]{5})")
_STAMP = "%Y%m%dT%H%M%SZ"
_BATCH = re.compile(r"^(\d{8}T\d{6}Z)(?:-\d+)?$")
_CREATING_MARKER = ".creating"  # services/server_create.py


@dataclass(frozen=True)
class Orphan:
    path: Path
    size: int


@dataclass(frozen=True)
class Undecidable:
    path: Path
    size: int
    reason: str


@dataclass(frozen=True)
class Survey:
    orphans: list[Orphan]
    undecidable: list[Undecidable]


@dataclass(frozen=True)
class Batch:
    """One `doctor --fix` run's quarantine directory."""
    path: Path
    created: datetime | None  # None: a name doctor did not give (never deleted)
    size: int


def survey(data_dir: DataDir, catalogue: Catalogue | None, connect: str,
           domains: Callable[[], list[DomainInfo]]) -> Survey:
    """Sort what lies in the data directory and nobody seems to use into orphans and
    undecidable files. *catalogue* None: it could not be opened (it proves nothing)."""
    orphans: list[Orphan] = []
    undecidable: list[Undecidable] = []
    _survey_image_files(data_dir, catalogue, orphans, undecidable)
    _survey_server_dirs(data_dir, connect, domains, orphans, undecidable)
    return Survey(orphans, undecidable)


def _survey_image_files(data_dir: DataDir, catalogue: Catalogue | None, orphans: list[Orphan],
                        undecidable: list[Undecidable]) -> None:
    rows = catalogue.find(ImageFilter(include_deleted=True)) if catalogue is not None else []
    kept = {i.path for i in rows if i.status is not ImageStatus.DELETED and i.path}
    kept |= {i.memory_path for i in rows if i.status is not ImageStatus.DELETED and i.memory_path}
    if catalogue is not None:
        for image in rows:
            kept.update(v.path for v in catalogue.volumes(image.id))
    busy = {i.id for i in rows if i.status is ImageStatus.CREATING and job_alive(i.job)}
    listed = {i.id for i in rows if i.status is not ImageStatus.DELETED}
    # Journals belong to crash recovery (it removes the partial output they name), not to us.
    journals = {path for _token, path in data_dir.export_journals()}
    merging = prune.live_work_files(data_dir)  # a running prune's journal and merge copy
    candidates = [p for p in _entries(data_dir.images_dir)
                  if p.name not in kept and p not in merging]
    candidates += [p for p in _entries(data_dir.tmp_dir)
                   if p not in journals and p not in merging and not _export_in_progress(p)]
    for path in _entries(data_dir.blank_overlays_dir):
        if path.name.startswith(".") and job_alive(path.suffix[1:]):
            continue  # being made by a running `servers create` or snapshot
        if data_dir.is_target_template(path.name):
            continue  # a backup target's template, of no one image (snapshots/targets.py)
        match = _ID_PREFIX.match(path.name)
        if not (match and match.group(1) in listed and path.suffix == ".qcow2"):
            candidates.append(path)
    for path in candidates:
        match = _ID_PREFIX.match(path.name)
        if match and match.group(1) in busy:
            continue  # a running job's work file
        if not rows and (match or path.parent == data_dir.images_dir):
            undecidable.append(Undecidable(path, _size(path), "the catalogue is empty: it "
                                           "proves nothing about image files"))
        else:
            orphans.append(Orphan(path, _size(path)))


def _survey_server_dirs(data_dir: DataDir, connect: str,
                        domains: Callable[[], list[DomainInfo]], orphans: list[Orphan],
                        undecidable: list[Undecidable]) -> None:
    # srv-*: bbsnap's servers; dom-<uuid>: disks a revert gave a domain bbsnap did not create
    directories = [p for p in _entries(data_dir.servers_dir)
                   if p.is_dir() and p.name.startswith(("srv-", DOMAIN_DIR_PREFIX))]
    if not directories:
        return
    try:
        listed = domains()
    except BbsnapError as exc:
        for path in directories:
            undecidable.append(Undecidable(path, _size(path), f"libvirt did not answer ({exc})"))
        return
    known = {d.name for d in listed} | {d.uuid for d in listed}
    for path in directories:
        if path.name in known or path.name.removeprefix(DOMAIN_DIR_PREFIX) in known or \
                _being_created(path):
            continue
        origin = read_origin(path)
        if origin is not None and origin.domain_uuid in known:
            continue  # renamed, but its domain is there
        if origin is None:
            reason = "no record of the libvirt connection it was made on"
        elif origin.connect != connect:
            reason = f"made on {printable(origin.connect)}, not on {printable(connect)}"
        else:
            orphans.append(Orphan(path, _size(path)))
            continue
        undecidable.append(Undecidable(path, _size(path), reason))


def _being_created(directory: Path) -> bool:
    """A live `servers create` is making it (a dead one's is crash recovery's to remove)."""
    try:
        token = (directory / _CREATING_MARKER).read_text().split()[0]
    except (OSError, IndexError):
        return False
    return job_alive(token)


# -- quarantine ------------------------------------------------------------------------------

def quarantine(data_dir: DataDir, orphans: list[Orphan],
               now: datetime | None = None) -> tuple[Path | None, list[Orphan]]:
    """Move *orphans* into a new quarantine batch; the batch and what was moved.

    An orphan that cannot be renamed there (another filesystem, gone meanwhile) stays put.
    """
    if not orphans:
        return None, []
    batch = _new_batch(data_dir, now or datetime.now(timezone.utc))
    moved = []
    for orphan in orphans:
        target = batch / orphan.path.relative_to(data_dir.root)
        target.parent.mkdir(mode=QUARANTINE_DIR_MODE, parents=True, exist_ok=True)
        try:
            os.rename(orphan.path, target)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                continue  # never copy a disk to reclaim space
            raise BbsnapError(f"cannot move {orphan.path} into quarantine: {exc.strerror}") \
                from exc
        moved.append(orphan)
    return batch, moved


def _new_batch(data_dir: DataDir, now: datetime) -> Path:
    data_dir.quarantine_dir.mkdir(mode=QUARANTINE_DIR_MODE, exist_ok=True)
    stamp = now.astimezone(timezone.utc).strftime(_STAMP)
    for suffix in ["", *(f"-{n}" for n in range(1, 100))]:
        batch = data_dir.quarantine_dir / (stamp + suffix)
        try:
            batch.mkdir(mode=QUARANTINE_DIR_MODE)
            return batch
        except FileExistsError:
            continue
    raise BbsnapError(f"too many quarantine batches named {stamp} in {data_dir.quarantine_dir}")


def batches(data_dir: DataDir) -> list[Batch]:
    """Every quarantine batch, oldest first."""
    found = []
    for path in sorted(_entries(data_dir.quarantine_dir)):
        match = _BATCH.match(path.name)
        created = (datetime.strptime(match.group(1), _STAMP).replace(tzinfo=timezone.utc)
                   if match else None)
        found.append(Batch(path, created, _size(path)))
    return found


def expired(batch: Batch, now: datetime) -> bool:
    return batch.created is not None and now - batch.created >= QUARANTINE_GRACE


def purge(data_dir: DataDir, now: datetime | None = None) -> list[Batch]:
    """Delete the quarantine batches older than the grace period; what was deleted."""
    now = now or datetime.now(timezone.utc)
    deleted = [b for b in batches(data_dir) if expired(b, now)]
    for batch in deleted:
        shutil.rmtree(batch.path)
    return deleted


# -- helpers ---------------------------------------------------------------------------------

def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except FileNotFoundError:
        return []


def _export_in_progress(path: Path) -> bool:
    """`img-xxxxx.export.TOKEN.qcow2` belongs to a running export while its job token lives
    (a token, not a pid: a reused pid would keep a dead export's file forever)."""
    parts = path.name.split(".")
    return len(parts) >= 4 and parts[1] == "export" and job_alive(parts[2])


def printable(text: str) -> str:
    """Text from files (names, records) as it may reach a terminal: control characters
    escaped, so it stays one line and cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _size(path: Path) -> int:
    """Bytes allocated on disk (what deleting frees), a directory's recursively."""
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(_size(p) for p in path.iterdir())
        return path.lstat().st_blocks * 512
    except OSError:
        return 0
