"""Decompressing a memory file ahead of the restore that reads it (services/memory_restore.py).

A FIFO holds 1 MiB: a feeder that decompresses only as QEMU reads does its work while the
restore waits for it, on a host of two shared cores. Started as the restore is called, a
thread decompresses into memory while libvirt starts the new QEMU, so the restore finds
the stream ahead of it: the 121 MiB stream of a 1 GiB tiny guest is decompressed in
0.12-0.14 s, and QEMU starts reading it 0.17-0.23 s after the call (libvirt's timeline: its
start of QEMU, then 398 ``qom-get`` round trips probing the guest CPU's features, 0.14 s,
before the migration stream is read). The memory held is bounded (``LIMIT``): past it the
thread waits for the feeder.

Until the seventeenth session the thread started before the old guest was destroyed. Moved
to the restore's call (256 MiB tiny guest, one held guest, two sets of 16 reverts in their
own processes, interleaved at random with the old order; medians): the destroy step 22
against 27-28 ms, the definition 4 against 5-6 ms, the restore step 0.296-0.311 against
0.324-0.337 s, the revert 0.432-0.443 against 0.462-0.488 s, and 3 of 32 restores over
0.4 s against 8. On two cores beside the old guest's vCPU, the decompressor took CPU from
libvirtd's end of the old QEMU; and its ring's 109 MiB were taken before the old QEMU's
memory was freed, which the new QEMU may then have met as pages its host had taken back
(bench_memory.py counts those).

The decompressed bytes go into a ring in memory (a memfd, so that nothing is left on disk
if the process is killed, and the pages are reused when the ring wraps) and from there
into the FIFO with ``splice``: the kernel hands the ring's pages to the pipe instead of
copying them in, and QEMU reads the pipe at about the speed of a file. Measured here
(kernel 6.18, 121 MiB of a 1 GiB guest's stream; fifteenth session): ``dd bs=32k`` (QEMU
reads 32 KiB at a time) from a 1 MiB pipe filled by ``os.write`` 0.051-0.059 s, by
``os.splice`` from a memfd 0.024 s, from a file on tmpfs 0.020 s; the restore itself (14
rounds each, shuffled, one process, one guest): from the written FIFO median 0.353 s, the
spliced one 0.331 s, a file 0.341 s; the migration stream's load step in libvirt's log
0.105-0.12 s written, 0.087-0.097 s spliced, 0.073-0.084 s from a file. Where ``splice``
cannot be used (a pipe larger than the ring's reserve, a kernel that refuses it) the feeder
copies with ``pread`` and ``write``, as before.

The ring must not overwrite bytes still in the pipe (``splice`` may hand the pipe the
ring's own pages): the thread writes at most ``LIMIT - RESERVE`` bytes ahead of what was
fed, and a pipe holds at most its capacity (checked against ``RESERVE`` before splicing).

Tried (fourteenth session, 1 GiB guest, 7 interleaved rounds each): starting the thread when
MemoryBoot is made (before the lock, journal and overlays) instead: the restore step 0.36
against 0.38 s, but the whole-file check's wait 0.033 against 0.015 s (the two threads
share two cores), the revert 0.578 against 0.580 s: not kept. Tried again in the fifteenth
session, with the check's CRC now ISA-L's and the ring spliced (1 GiB guest, 12 interleaved
rounds each, the revert in its own process): the restore step 0.346 against 0.336 s, the
revert 0.521 against 0.500 s, the check's wait 0.000 against 0.002 s: not kept either.
Tried in the sixteenth session (1 GiB guest, 10-12 interleaved reverts each, medians):
the decompressing thread at nice 10: restore step 0.377 against 0.351 s; a 48 MiB ring
instead of 256 (its pages reused sooner): restore 0.379 against 0.370 s, the step after it
6 against 12 ms (less to free), the revert the same 0.540 s; the ring freed by the feeder as
soon as all of it is in the pipe (off the catalogue step): restore 0.380 against 0.351 s,
the revert 0.557 against 0.528 s. On two shared cores whatever runs beside QEMU's start
and load slows them: none kept. And the decompression beside QEMU's start is not what costs:
restoring from the ring decompressed whole before the destroy, then fed, 0.339 s against
0.340 s for the ring filled as now, and 0.317 s from an unpacked file (1 GiB guest, one
process, 10 shuffled rounds). The ~0.02 s is the FIFO's own: each read QEMU makes from a
full pipe wakes the feeder to fill it again (121 MiB in 32 KiB reads), and a pipe larger
than pipe-max-size (1 MiB) is refused even to root here (EPERM: no CAP_SYS_RESOURCE).
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from typing import BinaryIO

from bbsnap.services import memory_file

LIMIT = 256 * 1024 * 1024   # the tiny guest's whole stream (109-121 MiB) fits; a big one waits
RESERVE = 2 * 1024 * 1024   # ring bytes kept from reuse: more than the restore's pipe holds


class _Cancelled(Exception):
    """The read-ahead was cancelled while its thread waited for room in the ring."""


class ReadAhead:
    """The bytes of *source* after *skip*, decompressed by a thread of their own into a ring
    in memory, and fed into a pipe by ``feed``. OSError if no ring can be made."""

    def __init__(self, source: BinaryIO, skip: int) -> None:
        self._size = max(LIMIT, memory_file.CHUNK + RESERVE)
        try:
            self._ring = os.memfd_create("bbsnap-read-ahead", os.MFD_CLOEXEC)
            os.ftruncate(self._ring, self._size)  # sparse: pages come as they are written
        except BaseException:
            source.close()
            raise
        self._source = source
        self._skip = skip
        self._written = 0  # stream bytes in the ring so far
        self._fed = 0      # of them, bytes handed to the pipe
        self._ended = False
        self._error: BaseException | None = None
        self._cancelled = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._skip:  # the header: the restore is fed it from memory
                memory_file.read_chunk(self._source, self._skip)
            while chunk := memory_file.read_chunk(self._source):
                self._put(chunk)
        except _Cancelled:
            pass
        except BaseException as exc:  # handed to the feeder
            self._error = exc
        finally:
            self._source.close()
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def _put(self, chunk: bytes) -> None:
        """Write *chunk* after the stream's bytes in the ring, once there is room."""
        with self._changed:
            self._changed.wait_for(lambda: self._cancelled or (
                self._written + len(chunk) - self._fed <= self._size - RESERVE))
            if self._cancelled:
                raise _Cancelled
            at = self._written
        view = memoryview(chunk)
        while view:  # wrapping at the ring's end
            offset = at % self._size
            written = os.pwrite(self._ring, view[:self._size - offset], offset)
            view, at = view[written:], at + written
        with self._changed:
            self._written = at
            self._changed.notify_all()

    def feed(self, first: bytes, fd: int) -> None:
        """Write *first*, then the stream, into the pipe *fd*, and close it. What reading
        the file raised (InvalidInputError) is raised here after the bytes before it;
        ``BrokenPipeError`` when the reader went away first: QEMU stops reading at the end
        of its migration stream, before libvirt's trailing bytes."""
        try:
            _write_all(fd, first)
            splicing = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) <= RESERVE
            while True:
                with self._changed:
                    self._changed.wait_for(lambda: self._written > self._fed or self._ended)
                    if self._written == self._fed:
                        if self._error is not None:
                            raise self._error
                        return
                    at, count = self._fed, self._written - self._fed
                offset = at % self._size
                count = min(count, self._size - offset)
                if splicing:
                    try:
                        sent = os.splice(self._ring, fd, count, offset_src=offset)
                    except OSError as exc:
                        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                            raise
                        splicing = False
                        continue
                else:
                    sent = os.write(fd, os.pread(self._ring, min(count, memory_file.CHUNK),
                                                 offset))
                with self._changed:
                    self._fed += sent
                    self._changed.notify_all()
        finally:
            os.close(fd)

    def cancel(self) -> None:
        """Stop the thread (waiting for room in the ring, or at its next chunk) and free
        the ring; after ``feed`` returned, if it was called."""
        if self._ring < 0:
            return
        with self._changed:
            self._cancelled = True
            self._changed.notify_all()
        self._thread.join()
        os.close(self._ring)
        self._ring = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
