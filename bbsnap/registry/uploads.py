"""Blob uploads: skipped when the repository has the blob, mounted from another
repository of the same registry when one had it, else sent in chunks that resume.

Each chunk's outcome is journalled (``DATA/registry/uploads/<key>.json``: the upload's
Location, which names the registry's session, no credential): after a dropped
connection the registry is asked how much it holds (``GET`` on the Location, its
``Range``) and the rest is sent from there; after a killed process, the next push of the
same blob does the same from the journal. A session the registry no longer knows starts
over.

A session taken up again (from the journal, or after a cut connection) can still be
refused further on: the killed process's half-sent PATCH may reach the registry's storage
after the status was asked (distribution then rejects the session's state, or the data's
digest at the closing PUT), or the registry may have expired the session. Such a refusal
is about that session, not about the blob or the account: the session is abandoned and
the blob sent once more in a fresh one, whose own errors are the ones reported.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from bbsnap import safe_files
from bbsnap.errors import NotFoundError, RegistryError
from bbsnap.registry.client import RETRY_DELAYS, ConnectionFailure, Readable, RegistryClient

Opener = Callable[[int], Readable]


class UploadJournal:
    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def _file(self, client: RegistryClient, digest: str) -> Path:
        key = hashlib.sha256(f"{client.ref.host}/{client.ref.repository}@{digest}".encode())
        return self._dir / f"{key.hexdigest()[:40]}.json"

    def location(self, client: RegistryClient, digest: str) -> str | None:
        data = safe_files.read_regular(self._file(client, digest), 1 << 16)
        try:
            found = json.loads(data) if data else None
            return str(found["location"]) if found else None
        except (json.JSONDecodeError, KeyError, TypeError):
            return None

    def save(self, client: RegistryClient, digest: str, location: str) -> None:
        if not self._dir.exists():
            for directory in (self._dir.parent, self._dir):  # DATA/registry/uploads
                directory.mkdir(mode=0o700, exist_ok=True)
        safe_files.write_atomic(self._file(client, digest),
                                json.dumps({"location": location}).encode(), mode=0o600)

    def drop(self, client: RegistryClient, digest: str) -> None:
        try:
            os.unlink(self._file(client, digest))
        except FileNotFoundError:
            pass


def ensure_blob(client: RegistryClient, journal: UploadJournal, digest: str, size: int,
                opener: Opener, *, mount_from: Iterable[str] = (),
                progress: Callable[[int], None] | None = None) -> str:
    """Make the repository hold *digest*; how: "present", "mounted" or "uploaded"."""
    if client.has_blob(digest):
        journal.drop(client, digest)
        return "present"
    for repository in mount_from:
        if repository != client.ref.repository and client.mount(digest, repository):
            journal.drop(client, digest)
            return "mounted"
    _upload(client, journal, digest, size, opener, progress)
    journal.drop(client, digest)
    return "uploaded"


class _SessionRefused(Exception):
    """A registry error in an upload session taken up again (not started afresh)."""

    def __init__(self, error: RegistryError | NotFoundError, location: str) -> None:
        super().__init__(str(error))
        self.error, self.location = error, location


def _upload(client: RegistryClient, journal: UploadJournal, digest: str, size: int,
            opener: Opener, progress: Callable[[int], None] | None) -> None:
    location, offset = _resumed(client, journal, digest)
    try:
        _send(client, journal, digest, size, opener, progress, location, offset)
    except _SessionRefused as refused:
        _abandon(client, refused.location)
        journal.drop(client, digest)
        try:
            _send(client, journal, digest, size, opener, progress, None, 0)
        except _SessionRefused as again:  # a cut, then a refusal, in the fresh session
            raise again.error from None


def _abandon(client: RegistryClient, location: str) -> None:
    """Cancel a refused session (best effort: the registry expires it anyway)."""
    try:
        client.request("DELETE", location, ok=(204, 200, 404))
    except (RegistryError, *ConnectionFailure):
        client.close()


def _send(client: RegistryClient, journal: UploadJournal, digest: str, size: int,
          opener: Opener, progress: Callable[[int], None] | None, location: str | None,
          offset: int) -> None:
    """Send *digest* from *offset* in the session at *location* (None: a new one)."""
    taken_up = location is not None
    failures = 0
    while True:
        try:
            if location is None:
                location, offset, taken_up = client.start_upload(), 0, False
                journal.save(client, digest, location)
            while offset < size:
                length = min(client.chunk_size, size - offset)
                location, held = client.patch(location, opener, offset, length)
                if not offset <= held <= offset + length:
                    raise RegistryError(f"{client.ref.host} reports {held} bytes of the upload "
                                        f"after {offset + length} were sent")
                offset = held
                journal.save(client, digest, location)
                failures = 0
                if progress is not None:
                    progress(offset)
            client.finish_upload(location, digest)
            return
        except (RegistryError, NotFoundError) as exc:  # NotFound: distribution's 404s
            if taken_up and location is not None:
                raise _SessionRefused(exc, location) from None
            raise
        except ConnectionFailure as exc:
            client.close()
            if failures >= len(RETRY_DELAYS):
                raise RegistryError(f"{client.ref.host}: uploading {digest} failed after "
                                    f"{failures} retries: {exc}") from None
            import time

            time.sleep(RETRY_DELAYS[failures])
            failures += 1
            asked = location or ""
            held_now = client.retrying("asking how much of an upload arrived",
                                       functools.partial(client.upload_offset, asked))
            if held_now is None or not isinstance(held_now, int) or held_now > size:
                location = None  # the registry dropped the session: start over
            else:
                offset, taken_up = held_now, True


def _resumed(client: RegistryClient, journal: UploadJournal,
             digest: str) -> tuple[str | None, int]:
    """A journalled session of this blob that the registry still holds, and its offset."""
    location = journal.location(client, digest)
    if location is None:
        return None, 0
    try:
        path = client.upload_path(location)
        held = client.retrying("resuming an upload", lambda: client.upload_offset(path))
    except RegistryError:
        held = None
    if not isinstance(held, int):
        journal.drop(client, digest)
        return None, 0
    return path, held
