"""Decompressing a memory file ahead of the restore that reads it (services/memory_restore.py).

A FIFO holds 1 MiB: a feeder that decompresses only as QEMU reads does its work while the
restore waits for it, on a host of two shared cores. Started just before the guest is
destroyed, a thread decompresses into memory while the old QEMU is ended (0.04-0.05 s since
hypervisor/qemu_exit.py; libvirt 9.0's own destroy waited 0.2 s more) and the new one
starts, so the restore finds the stream ahead of it. The memory held is bounded (``LIMIT``): past it the thread
waits for the restore to take chunks.

Tried (fourteenth session, 1 GiB guest, 7 interleaved rounds each): starting the thread when
MemoryBoot is made (before the lock, journal and overlays) instead: the restore step 0.36
against 0.38 s, but the whole-file check's wait 0.033 against 0.015 s (the two threads
share two cores), the revert 0.578 against 0.580 s: not kept. The decompression itself is
not what the restore waits for: the 121 MiB stream decompresses in 0.11 s here (`zstd -dc`
0.10 s), the restore step is 0.33-0.57 s, about `virsh restore`'s whole run.
"""

from __future__ import annotations

import queue
import threading
from typing import BinaryIO, Iterator

from bbsnap.services import memory_file

LIMIT = 256 * 1024 * 1024   # the tiny guest's whole stream (109-121 MiB) fits; a big one waits
_DONE = b""


class ReadAhead:
    """The chunks of *source* (after *skip* bytes), read by a thread of their own."""

    def __init__(self, source: BinaryIO, skip: int) -> None:
        self._source = source
        self._skip = skip
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(
            maxsize=max(1, LIMIT // memory_file.CHUNK))
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._skip:  # the header: the restore is fed it from memory
                memory_file.read_chunk(self._source, self._skip)
            while not self._cancelled.is_set():
                chunk = memory_file.read_chunk(self._source)
                self._chunks.put(chunk)
                if chunk == _DONE:
                    return
        except BaseException as exc:  # handed to the reader of the chunks
            self._chunks.put(exc)
        finally:
            self._source.close()

    def chunks(self) -> Iterator[bytes]:
        """The decompressed chunks in order; what reading them raised, raised here."""
        while True:
            item = self._chunks.get()
            if isinstance(item, BaseException):
                raise item
            if item == _DONE:
                return
            yield item

    def cancel(self) -> None:
        """Stop the thread (it is waiting on a full queue, or ends at its next chunk)."""
        self._cancelled.set()
        while self._thread.is_alive():
            try:  # make room: a thread blocked putting a chunk sees the cancel after it
                self._chunks.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
