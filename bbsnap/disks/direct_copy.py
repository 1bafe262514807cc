"""Copy a finished file from RAM onto the disk with O_DIRECT, a bounded number of writes at a time.

Why (issue #15, the guest's view of a full copy): QEMU's backup job writes its target
through the page cache three times faster than the disk here takes it, so whatever paces
the writeback (disks/writeback.py), about half the copy is still dirty when the job ends
and its flush sends it at once; every fsync on that filesystem, the guest's flushes of its
own disk included, then waits behind hundreds of MiB (the guest's longest write gap 3.2x
at 8 GiB / 1 GiB of data what it is at 64 MiB). With the target in RAM (DataDir.qemu_ram_dir,
services/snapshots/targets.py) the job touches no disk at all, and this copy then keeps at
most DEPTH writes of CHUNK in the disk's queue (O_DIRECT: no page cache, no writeback of
the kernel's own to wait behind), so a guest's flush waits behind a few MiB at most.

The copy is exact: every byte of the file, holes left as holes (SEEK_DATA), its length
kept; the tail that is not a multiple of ALIGN goes through an ordinary descriptor. Where
the filesystem takes no O_DIRECT (EINVAL: tmpfs, some FUSE), the same copy is buffered.
Durable when it returns (safe_files.publish: fsync, rename, the directory's fsync).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

from bbsnap import safe_files

CHUNK = 4 << 20   # bytes per write
DEPTH = 2         # writes in flight at once (one thread each)
ALIGN = 4096      # O_DIRECT's offsets and lengths: a multiple of any disk's logical block


def partial_of(final: Path) -> Path:
    """Where the copy is written before its rename (named after the image: a failed
    snapshot's clean-up, DataDir.remove_image_files, removes it with the rest)."""
    return final.with_name(f"{final.name}.partial")


def publish_from_ram(source: Path, final: Path, *, mode: int) -> None:
    """*source* copied to *final* (a new file there, or replacing one), durably, with
    *mode*; *source* is left as it was. OSError (ENOSPC ...) with no partial file left."""
    partial = partial_of(final)
    try:
        _copy(source, partial)
        safe_files.publish(partial, final, mode=mode)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _copy(source: Path, dest: Path) -> None:
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = os.fstat(src).st_size
        plain = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                        | os.O_NOFOLLOW, 0o600)
        try:
            direct = _direct_descriptor(dest)
            try:
                body = size // ALIGN * ALIGN
                _copy_body(src, direct if direct is not None else plain, body)
                if size > body:
                    os.pwrite(plain, os.pread(src, size - body, body), body)
            finally:
                if direct is not None:
                    os.close(direct)
            os.ftruncate(plain, size)  # holes at the end are part of the length (the
            # fsync is safe_files.publish's)
        finally:
            os.close(plain)
    finally:
        os.close(src)


def _direct_descriptor(dest: Path) -> int | None:
    try:
        return os.open(dest, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None  # the filesystem takes no O_DIRECT: buffered, fsynced at the end
        raise


def _copy_body(src: int, dest: int, body: int) -> None:
    """[0, body) of *src* into *dest*, DEPTH threads each writing every DEPTH-th chunk."""
    failures: list[BaseException] = []
    stop = threading.Event()

    def writer(first: int) -> None:
        buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
        try:
            for offset in range(first * CHUNK, body, DEPTH * CHUNK):
                if stop.is_set():
                    return
                length = min(CHUNK, body - offset)
                if _is_hole(src, offset, length):
                    continue
                view = memoryview(buffer)[:length]
                try:
                    got = os.preadv(src, [view], offset)
                    if got != length:
                        raise OSError(errno.EIO, f"short read at {offset} of the copy in RAM")
                    # A regular file's write is whole or fails; short only when the
                    # filesystem fills up half-way through it.
                    if os.pwritev(dest, [view], offset) != length:
                        raise OSError(errno.ENOSPC, f"short write at {offset} of the copy")
                finally:
                    view.release()
        except BaseException as exc:
            failures.append(exc)
            stop.set()
        finally:
            buffer.close()

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(DEPTH)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def _is_hole(fd: int, offset: int, length: int) -> bool:
    """Whether [offset, offset + length) of *fd* holds no data (SEEK_DATA finds none)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return True  # no data at or after offset
        return False  # SEEK_DATA not supported: copy it
