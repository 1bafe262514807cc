"""The journal of a rebuild (and so of a revert), for the command after a SIGKILL.

A rebuild makes new overlays (one per disk it replaces), stops the server, points its
definition at them (one new definition) and starts it again; a killed process can stop
anywhere in between. Before it makes anything it writes ``.rebuilding`` in the server's
directory (a bbsnap server's, or a foreign domain's ``dom-<uuid>``: services/server_disks.py;
atomically: it is whole or absent), and it removes the journal once the old disks are gone.
The next command settles a journal whose process is dead, under the server's lock, by what
the definition points at:

- the new overlays: roll forward (the old image's hold dropped, the old disks deleted if
  bbsnap made them: a disk the user's domain came with is never deleted);
- the old disks: roll back (the half-made or unused overlays deleted, the new image's hold
  dropped, the tracking marker restored);
- anything else (someone redefined it since): nothing is deleted, only the journal.

Either way the server runs again if it ran before. An old disk is deleted only once the
definition no longer names it, so the server always has whole disks.
"""

from __future__ import annotations

import json
import time
from bbsnap.lazy_dataclass import dataclass
from dataclasses import asdict
from pathlib import Path

from bbsnap.state import locks
from bbsnap.state.catalogue import Catalogue
from bbsnap.errors import BbsnapError, NotFoundError
from bbsnap.hypervisor import DomainState, Hypervisor
from bbsnap.state.process_tokens import job_alive
from bbsnap.state.layout import REBUILD_JOURNAL, DataDir
from bbsnap.models import DependentKind
from bbsnap.safe_files import write_atomic
from bbsnap.services.snapshots import change_tracking

JOURNAL = REBUILD_JOURNAL
MAX_JOURNAL = 64 * 1024


@dataclass(frozen=True)
class DiskSwap:
    device: str                 # the disk being replaced (vda)
    old_disk: str
    new_disk: str


@dataclass(frozen=True)
class RebuildJournal:
    token: str                  # the rebuilding process (process_tokens.current_job_token)
    server_id: str
    uuid: str                   # the server lock's key, and a foreign domain's directory's
    swaps: tuple[DiskSwap, ...]  # every disk replaced, all in one new definition
    old_image_id: str | None
    new_image_id: str
    was_running: bool
    old_marker: str | None      # the tracking marker's text before the new overlay replaced it


def journal_path(directory: Path) -> Path:
    return directory / JOURNAL


def write(directory: Path, journal: RebuildJournal) -> None:
    write_atomic(journal_path(directory), json.dumps(asdict(journal)).encode())


def remove(directory: Path) -> None:
    journal_path(directory).unlink(missing_ok=True)


def read_marker(server_dir: Path) -> str | None:
    try:
        return (server_dir / change_tracking.MARKER).read_text()
    except OSError:
        return None


def restore_marker(server_dir: Path, text: str | None) -> None:
    """Put the tracking marker back as it was (a new overlay's birth rewrote it)."""
    marker = server_dir / change_tracking.MARKER
    if text is None:
        marker.unlink(missing_ok=True)
    else:
        marker.write_text(text)


def _read(path: Path) -> RebuildJournal | None:
    try:
        with path.open("rb") as stream:
            data = json.loads(stream.read(MAX_JOURNAL))
        if "device" in data:  # written by bbsnap before multi-disk rebuilds: one disk
            data["swaps"] = [{"device": data.pop("device"), "old_disk": data.pop("old_disk"),
                              "new_disk": data.pop("new_disk")}]
        data["swaps"] = tuple(DiskSwap(**swap) for swap in data["swaps"])
        return RebuildJournal(**data)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def journals_left(data_dir: DataDir) -> list[Path]:
    """Every rebuild journal in the data directory: bbsnap servers' and foreign domains'."""
    return data_dir.rebuild_journals()


def recover_interrupted_rebuilds(catalogue: Catalogue, data_dir: DataDir,
                                 hv: Hypervisor) -> list[str]:
    """Settle the journals of killed rebuilds; the ids of the servers settled."""
    settled = []
    for path in journals_left(data_dir):
        journal = _read(path)
        if journal is None or path.parent not in _owner_directories(data_dir, journal):
            continue  # not one this code wrote: leave it for a human (doctor lists the dir)
        if job_alive(journal.token):
            continue
        lock = locks.try_acquire(data_dir.locks_dir, journal.uuid)
        if lock is None:
            continue  # another command works on the server; it (or the next one) settles it
        with lock:
            _settle(catalogue, hv, journal, path.parent)
            path.unlink(missing_ok=True)
        settled.append(journal.server_id)
    return settled


def _owner_directories(data_dir: DataDir, journal: RebuildJournal) -> set[Path]:
    """Where a journal of this server may sit: its bbsnap server's directory, or its
    foreign domain's (services/server_disks.py)."""
    owners = {data_dir.server_dir(journal.server_id)}
    try:
        owners.add(data_dir.domain_dir(journal.uuid))
    except ValueError:
        pass  # not a UUID: no foreign domain's directory
    return owners


def _settle(catalogue: Catalogue, hv: Hypervisor, journal: RebuildJournal,
            directory: Path) -> None:
    """By what the definition points at (the domain looked up by UUID: a name may have
    changed since): every new disk, every old one, or something else."""
    try:
        disks = hv.facts(journal.uuid, inactive=True).file_disks
    except NotFoundError:
        return  # the server was destroyed since; its directory went with it
    current = {d.target: d.path for d in disks}
    changed = journal.new_image_id != journal.old_image_id
    if all(current.get(s.device) == s.new_disk for s in journal.swaps):
        if changed and journal.old_image_id:
            catalogue.remove_dependent(DependentKind.SERVER, journal.server_id,
                                       journal.old_image_id)
        for swap in journal.swaps:
            old = Path(swap.old_disk)
            if old.parent == directory and old != Path(swap.new_disk):
                old.unlink(missing_ok=True)  # bbsnap's; a disk the user brought stays
    elif all(current.get(s.device) == s.old_disk for s in journal.swaps):
        for swap in journal.swaps:
            new = Path(swap.new_disk)
            if new.parent == directory:  # only ever made there; never delete anything else
                new.unlink(missing_ok=True)
        if changed:
            catalogue.remove_dependent(DependentKind.SERVER, journal.server_id,
                                       journal.new_image_id)
        restore_marker(directory, journal.old_marker)
    if journal.was_running:
        _start_again(hv, journal.uuid)


def _start_again(hv: Hypervisor, server_id: str) -> None:
    """Start the server unless it runs. Asked of libvirt rather than judged by its state: a
    destroy the killed process asked for goes on in libvirtd after its client died (the state
    still reads running meanwhile), and libvirt queues the start behind it."""
    if _settled_state(hv, server_id) is DomainState.PAUSED:
        return  # paused by someone since: theirs to resume
    try:
        hv.start(server_id)
    except BbsnapError:
        pass  # running already, or won't start: the disk is whole; `servers start` says why


STARTING_UP_WAIT = 30.0  # seconds a domain may read paused while libvirt still starts it


def _settled_state(hv: Hypervisor, server_id: str) -> DomainState:
    """The domain's state once a start in progress is done. libvirt starts QEMU paused (-S)
    and resumes it when the domain is set up; a start the killed command had asked for goes
    on in libvirtd, so `paused` read at once may only mean "still starting" (seen: a killed
    revert's server was left paused when recovery took that for a user's pause)."""
    deadline = time.monotonic() + STARTING_UP_WAIT
    state = hv.info(server_id).state
    while state is DomainState.PAUSED and time.monotonic() < deadline:
        time.sleep(0.2)
        state = hv.info(server_id).state
    return state
