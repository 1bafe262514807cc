"""Reverting a server to a memory snapshot: the guest continues from the snapshot's instant.

The revert is the rebuild of services/servers.py (a new tracked overlay on the snapshot's
disk, the definition pointed at it, journaled against a SIGKILL); only the last step
differs: instead of booting, the memory image is restored with ``virDomainRestoreFlags``
and a definition whose disk source is that new overlay. Restoring the saved definition
unchanged would make the guest write into the disk file it had at the snapshot, and so
into nothing bbsnap keeps (or worse, into a file the snapshot depends on).

The stored memory file is compressed (memory_file.py says why bbsnap and not libvirt
unpacks it). It is *streamed* into libvirt: a FIFO in tmp/ (``restore.TOKEN.fifo``, 0600)
that a thread of this process fills from the decompressor while libvirt (QEMU, in fact:
libvirt hands it the open FIFO) reads it. libvirt 9.0 opens the path once, reads its
header and definition and passes the descriptor to QEMU's incoming migration, which reads
sequentially: a FIFO works. Measured on the tiny guest (libvirt 9.0, QEMU 7.2, TCG, two
shared cores; scripts/bench_memory.py, medians of 3, two runs): the restore from the
stream took 0.83-1.00 s at 1 GiB and 256 MiB of RAM, against 1.13-1.60 s for unpacking the
same file (0.26-0.30 s) and restoring from it (0.86-1.30 s). The decompression runs ahead, from
the restore's call, while libvirt starts QEMU (read_ahead.py): a feeder decompressing only as QEMU read made the
restore 0.15-0.25 s slower than from a file on that loaded host; it fills the FIFO with
``splice`` from a ring in memory, at about a file's speed (read_ahead.py has the figures).

What the stream costs is the order: the checks before the guest is touched must not
consume it. So the header (with the saved definition the refusals read) is read from the
start of the decompressed stream (``Hypervisor.saved_head``) and fed to libvirt first, and
the whole file is checked once (``memory_file.verify``, in a thread, while the rebuild
takes the lock and makes the overlays) *before* the guest is stopped: a damaged file is
refused with nothing changed, as it was when the file was unpacked first. Tried (sixteenth
session, 256 MiB guest, 10 interleaved reverts): beginning that check before the header is
read instead: the header step took 9 ms against 5 and the wait for the check 10 against
12 (the two threads share two cores): the same 31 ms from the revert's start to the
destroy. Not kept.

Fallback: if tmp/ cannot hold a FIFO, or libvirt fails restoring from it with the guest
shut off (a libvirt that reads the image other than sequentially, or a security driver that
opens only regular files), the file is unpacked into tmp/ (``restore.TOKEN.save``) and
restored from there, as before. The next command removes a FIFO or file a killed revert
left (``remove_stale``, by the job token in the name); libvirt keeps what it opened.

Refused, each with what differs: another server's memory (the saved UUID is not the
server's), a definition whose machine type, CPU, RAM, vCPUs or device set changed since
(QEMU's migration stream would not load, or would load into the wrong hardware), and host
devices (they cannot be migrated, so not restored).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bbsnap.background import Background
from bbsnap.errors import ConflictError, HypervisorError, InvalidInputError
from bbsnap.hypervisor import DomainState, Hardware, Hypervisor, SavedDomain, SavedHead
from bbsnap.state.process_tokens import current_job_token
from bbsnap.state.layout import DataDir
from bbsnap.models import Image, Server
from bbsnap.services import memory_file
from bbsnap.services.read_ahead import ReadAhead
from bbsnap.services.restore_work import remove_stale, restore_fifo, restore_file

__all__ = ["MemoryBoot", "check", "mismatches", "prepared", "remove_stale", "restore_fifo",
           "restore_file", "write_timeline"]
from bbsnap.services.snapshots.timeline import Timeline

PIPE_SIZE = 1024 * 1024  # Linux's default pipe-max-size: the decompressor runs ahead of QEMU


class MemoryBoot:
    """The memory revert's steps inside the rebuild (services/servers.py), under the lock:
    ``ready`` before the guest is stopped, then the call, which restores it onto the new
    overlays (device -> file) and leaves it running."""

    def __init__(self, hv: Hypervisor, data_dir: DataDir, stored: Path, head: SavedHead,
                 timeline: Timeline) -> None:
        self._hv = hv
        self._data_dir = data_dir
        self._stored = stored
        self._head = head
        self._timeline = timeline
        self._token = current_job_token()
        self.streamed = False  # whether the restore read the FIFO (the benchmark prints it)
        self._ahead: ReadAhead | None = None
        self._verifying = Background(lambda: memory_file.verify(stored))
        self._releasing: Background | None = None  # the read-ahead's end, once restored

    def ready(self) -> None:
        """The whole memory file was checked and is intact (else InvalidInputError). Its
        decompression starts later, with the restore (read_ahead.py says why)."""
        error = self._verifying.join()
        self._timeline.mark("verified")
        if error is not None:
            raise error

    def _read_ahead(self) -> ReadAhead | None:
        """The decompression started, or None if no ring for it can be made (the file is
        then unpacked, as where no FIFO can be made)."""
        try:
            return ReadAhead(memory_file.open_stream(self._stored), len(self._head.data))
        except OSError:
            return None

    def close(self) -> None:
        """Wait for the check's thread and stop the read-ahead (a refusal or a failure
        after them: the file is not needed any more)."""
        self._verifying.join()
        if self._releasing is not None:
            self._releasing.join()
        elif self._ahead is not None:
            self._ahead.cancel()

    def __call__(self, new_disks: dict[str, Path]) -> None:
        try:
            if self._restore_streamed(new_disks):
                self.streamed = True
                return
        except HypervisorError:
            # By UUID: the saved name is the one the domain had at the snapshot.
            if self._hv.info(self._head.domain.uuid).state is not DomainState.SHUTOFF:
                raise  # not a stream libvirt could not read: nothing to try again
        self._restore_unpacked(new_disks)

    def _restore_streamed(self, new_disks: dict[str, Path]) -> bool:
        """Restore from a FIFO fed by the decompressor; False if no FIFO can be made."""
        self._ahead = self._read_ahead()
        ahead = self._ahead
        if ahead is None:
            return False
        fifo = restore_fifo(self._data_dir, self._token)
        try:
            os.mkfifo(fifo, 0o600)
        except OSError:
            return False
        # Our own reader and writer ends, held until the restore returns: opening the
        # feeder's end then waits for nobody; libvirt's open (which waits for a writer)
        # never finds none, even if the feeder is done before libvirt opens the FIFO (QEMU
        # stops at its stream's end marker: it needs no end of file); and closing our
        # reader after the restore makes a feeder blocked on a reader that went away fail
        # (EPIPE) instead of waiting forever.
        held: list[int] = []
        try:
            held.append(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
            held.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.set_blocking(writer, True)
            try:
                fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # a smaller pipe only makes the feeder wait more often
            first = self._head.data
            feeding = Background(lambda: ahead.feed(first, writer))
            try:
                self._hv.restore_memory(fifo, new_disks, head=self._head)
            except HypervisorError:
                os.close(held.pop(0))  # our reader: a feeder left alone gets EPIPE
                error = feeding.join()
                if error is not None and not isinstance(error, BrokenPipeError):
                    raise error from None  # the stream broke (the file changed since its check)
                raise
            os.close(held.pop(0))
            # The guest runs: QEMU read its whole stream (it checks every section), so what
            # the feeder met after that (EPIPE on libvirt's trailing bytes) does not matter.
            feeding.join()
            self._timeline.mark("restored")
            # Freeing the ring's pages takes 5-9 ms for the tiny guest's 109-121 MiB stream
            # (seventeenth session): a thread does it while the revert records its end.
            self._releasing = Background(ahead.cancel, name="read-ahead release")
            return True
        finally:
            for fd in held:
                os.close(fd)
            fifo.unlink(missing_ok=True)

    def _restore_unpacked(self, new_disks: dict[str, Path]) -> None:
        unpacked = restore_file(self._data_dir, self._token)
        try:
            memory_file.unpack(self._stored, unpacked)
            self._timeline.mark("unpacked")
            self._hv.restore_memory(unpacked, new_disks)
            self._timeline.mark("restored")
        finally:
            unpacked.unlink(missing_ok=True)


@contextmanager
def prepared(hv: Hypervisor, data_dir: DataDir, server: Server, image: Image,
             timeline: Timeline) -> Iterator[MemoryBoot]:
    """Check *image*'s memory for *server* (its header: nothing is unpacked, the server not
    touched); yields the steps that restore the server from it onto new overlays."""
    if not image.memory_path:
        raise ConflictError(f"image {image.id} holds no memory state")
    stored = data_dir.image_path(image.memory_path)
    with memory_file.open_stream(stored) as stream:
        try:
            head = hv.saved_head(stream)
        except (HypervisorError, *memory_file.READ_ERRORS) as exc:  # type: ignore[misc]
            raise InvalidInputError(f"the memory file of image {stored.name} cannot be read: "
                                    f"{exc}") from exc
    check(server, image, head.domain, hv.hardware(server.id, migratable=True))
    timeline.mark("checked")
    boot = MemoryBoot(hv, data_dir, stored, head, timeline)
    try:
        yield boot
    finally:
        boot.close()


def check(server: Server, image: Image, saved: SavedDomain, now: Hardware) -> None:
    """Refuse a memory image that is not this server's, or no longer fits its definition."""
    if saved.uuid.lower() != server.uuid.lower():
        raise ConflictError(
            f"image {image.id} holds the memory of another server ({saved.name}), not of "
            f"{server.id}", hint=f"boot it from its disk with 'bbsnap servers create {image.id}'")
    if now.host_devices:
        raise ConflictError(f"server {server.id} has host devices, which cannot be restored "
                            f"with a memory image ({', '.join(now.host_devices)})",
                            hint="revert with --disk-only")
    differences = mismatches(saved.hardware, now)
    if differences:
        raise ConflictError(
            f"the memory snapshot {image.id} no longer matches server {server.id}: "
            + "; ".join(differences), hint="revert with --disk-only to boot from its disk")


def mismatches(saved: Hardware, now: Hardware) -> list[str]:
    """What changed between the hardware a memory image was saved on and the definition now."""
    found = []
    if saved.machine != now.machine:
        found.append(f"machine type {saved.machine} then, {now.machine} now")
    if saved.cpu != now.cpu:
        found.append(f"CPU {saved.cpu} then, {now.cpu} now")
    if saved.memory_kib != now.memory_kib:
        found.append(f"RAM {saved.memory_kib // 1024} MiB then, {now.memory_kib // 1024} MiB now")
    if saved.vcpus != now.vcpus:
        found.append(f"{saved.vcpus} vCPUs then, {now.vcpus} now")
    gone = sorted(set(saved.devices) - set(now.devices))
    added = sorted(set(now.devices) - set(saved.devices))
    if gone or added:
        found.append("devices changed (" + ", ".join(
            [f"removed {d}" for d in gone] + [f"added {d}" for d in added]) + ")")
    return found


def write_timeline(data_dir: DataDir, server: Server, timeline: Timeline) -> Path:
    """The revert's timeline (when each step ended) as one line in logs/revert-UUID.log,
    replaced by each memory revert of the server: scripts/bench_memory.py prints it."""
    path = data_dir.logs_dir / f"revert-{server.uuid}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(timeline.line() + "\n")
    return path
