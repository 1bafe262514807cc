"""Recover work interrupted by a crash: no image stays `creating` after its process died.

Run at the start of catalogue-using commands. Cheap when there is nothing to do
(one indexed query), so it can run every time.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

from bbsnap.state import locks
from bbsnap.state.catalogue import Catalogue
from bbsnap.errors import CataloguePathError
from bbsnap.state.process_tokens import job_alive
from bbsnap.state.layout import DataDir
from bbsnap.models import Image

# Hands an orphaned snapshot (image id, the server lock now held) to a new worker.
Adopter = Callable[[str, locks.ServerLock], None]


def recover_interrupted(catalogue: Catalogue, data_dir: DataDir,
                        adopt_snapshot: Adopter | None = None) -> list[Image]:
    """Finish or fail images whose creating process is gone; delete their work files.

    A snapshot whose worker died is handed to a new worker (which finishes the copy
    if libvirt still runs or completed it, and fails it cleanly otherwise). The
    server's lock tells whether a worker is still alive: it holds the lock.

    The list of ``creating`` rows is a snapshot of the catalogue: by the time a row's
    process is found gone, that process may have made the image available and exited, or
    (a snapshot's command) handed it to a worker. So each decision is taken again on the
    row as it is then, under the catalogue's write lock (Catalogue.fail_abandoned) or, for
    a snapshot, under its server's lock; deciding on the listed row alone removed the file
    of an image that had just become available (seen in test_concurrency.py's eight
    processes: an ``available`` row left without its file).
    """
    recovered = []
    for image in catalogue.creating():
        if job_alive(image.job):
            continue
        remove_files = functools.partial(_remove_work_files, data_dir, image.id)
        job = catalogue.snapshot_job(image.id)
        if job is not None:
            lock = locks.try_acquire(data_dir.locks_dir, job.domain_uuid)
            if lock is None:
                continue  # a worker (or another command) is working on that server
            with lock:
                if not catalogue.abandoned(image.id):
                    continue  # finished, or handed to a worker, since the list was read
                if adopt_snapshot is not None:
                    adopt_snapshot(image.id, lock)
                    continue
                failed = catalogue.fail_abandoned(
                    image.id, "interrupted: the bbsnap worker copying it stopped", remove_files)
        else:
            failed = catalogue.fail_abandoned(
                image.id, "interrupted: the bbsnap process creating it stopped", remove_files)
        if failed is not None:
            recovered.append(failed)
    return recovered


def _remove_work_files(data_dir: DataDir, image_id: str) -> None:
    """Remove an interrupted job's files, unless its row's id could not name only them
    (an id edited into a path): then nothing is removed, the row still fails, and every
    other command keeps working instead of tripping over that row each time."""
    try:
        data_dir.remove_image_files(image_id)
    except CataloguePathError:
        pass


def recover_interrupted_creates(catalogue: Catalogue, data_dir: DataDir,
                                domain_exists: Callable[[str], bool]) -> list[str]:
    """Remove what a `servers create` killed before defining its domain left behind."""
    from bbsnap.models import DependentKind

    removed = []
    for marker in data_dir.servers_dir.glob("srv-*/.creating"):
        try:
            token, image_id = marker.read_text().split()
        except (OSError, ValueError):
            token, image_id = "", ""
        if job_alive(token):
            continue
        server_id = marker.parent.name
        if domain_exists(server_id):
            marker.unlink(missing_ok=True)  # it got as far as a definition: it is a server
            continue
        if image_id:
            catalogue.remove_dependent(DependentKind.SERVER, server_id, image_id)
        import shutil  # here: it imports bz2 and lzma, ~2 ms of every command otherwise

        shutil.rmtree(marker.parent, ignore_errors=True)
        removed.append(server_id)
    return removed


def recover_interrupted_exports(data_dir: DataDir) -> list[str]:
    """Remove the `.partial` output of exports whose process died (named by their journal)."""
    removed = []
    for token, journal in data_dir.export_journals():
        if job_alive(token):
            continue
        try:
            partial = journal.read_text().strip()
        except OSError:
            partial = ""
        if partial.endswith(".partial"):
            Path(partial).unlink(missing_ok=True)
            removed.append(partial)
        journal.unlink(missing_ok=True)
    return removed
