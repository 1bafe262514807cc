"""Creating and publishing files without following anyone's symlinks (DESIGN §8).

bbsnap runs as root and writes into directories other users may write too (a
sticky ``/tmp``, a directory a user made for an export). A plain ``open()`` of
a name there follows whatever symlink was planted under it, so root would
overwrite any file. Here every file is made under a fresh unique name with
``O_CREAT|O_EXCL|O_NOFOLLOW`` and an explicit mode, filled, fsynced and then
renamed over the final name ("atomic publish"); a final name that exists and
is not a regular file (a symlink, FIFO, device, directory) is refused.

Work in an :class:`OutputDir`: the directory is opened once and every name is
created, checked and renamed relative to that descriptor, so swapping the
directory (or a parent) for a symlink half-way cannot move the output elsewhere.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import Self

from bbsnap.errors import InvalidInputError

PRIVATE = 0o600            # exports and work files: what a guest wrote is private
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME_ATTEMPTS = 16        # a random 64-bit name collides only if someone planted it


def describe_kind(mode: int) -> str:
    """What a non-regular file is, for a message ("a symlink", "a FIFO" ...)."""
    for test, kind in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


class OutputDir:
    """One directory, opened once; every file operation is relative to its descriptor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def exists(self, name: str) -> bool:
        """Is there a regular file called *name*? Raise if the name is anything else."""
        try:
            info = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputError(
                f"{self.path / name} exists and is {describe_kind(info.st_mode)}; bbsnap "
                "only replaces regular files")
        return True

    def temp_name(self, final_name: str, suffix: str = ".tmp") -> str:
        """A fresh unguessable name beside *final_name* (to journal before creating it)."""
        # os.urandom, which secrets.token_hex reads too, without secrets' own imports (random,
        # hmac, hashlib: ~4 ms of every command that publishes a file)
        return f"{final_name}.{os.urandom(8).hex()}{suffix}"

    def create(self, name: str, mode: int = PRIVATE) -> int:
        """Create the new file *name* (never an existing one, never through a symlink)."""
        fd = os.open(name, CREATE_FLAGS, mode, dir_fd=self.fd)
        os.fchmod(fd, mode)  # the umask may have taken bits away: the mode is a decision
        return fd

    def create_temp(self, final_name: str, suffix: str = ".tmp",
                    mode: int = PRIVATE) -> tuple[str, int]:
        """A new, empty, uniquely named file beside *final_name*: its name and a write fd."""
        for _ in range(_NAME_ATTEMPTS):
            name = self.temp_name(final_name, suffix)
            try:
                return name, self.create(name, mode)
            except FileExistsError:
                continue
        raise FileExistsError(f"could not create a new file beside {self.path / final_name}")

    def publish(self, temp_name: str, final_name: str) -> None:
        """Rename the finished *temp_name* over *final_name* (a regular file or nothing)."""
        self.exists(final_name)
        os.rename(temp_name, final_name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def remove(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def sync(self) -> None:
        """Make the renames in this directory durable."""
        os.fsync(self.fd)

    def write_file(self, final_name: str, data: bytes, mode: int = PRIVATE) -> None:
        """Publish *data* as *final_name*: temporary file, fsync, rename (no directory fsync)."""
        temp, fd = self.create_temp(final_name, mode=mode)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            self.publish(temp, final_name)
        except BaseException:
            self.remove(temp)
            raise


def write_atomic(path: Path, data: bytes, mode: int = PRIVATE) -> None:
    """Replace the regular file *path* (or create it) with *data*, durably."""
    with OutputDir(path.parent) as directory:
        directory.write_file(path.name, data, mode)
        directory.sync()


def publish(temp: Path, final: Path, *, mode: int | None = None) -> None:
    """Put the finished file *temp* in place as *final* (same file system), durably: fsync
    it, set *mode*, refuse a *final* that is not a regular file, rename, fsync the final
    directory. For work files bbsnap made itself, e.g. in its data directory's tmp/."""
    fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        if mode is not None:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    with OutputDir(final.parent) as directory:
        directory.exists(final.name)
        os.rename(temp.absolute(), final.name, dst_dir_fd=directory.fd)
        directory.sync()


def copy_sparse(source: Path, target: Path) -> None:
    """A copy of bbsnap's own regular file *source* as the new file *target* (0600, made
    with O_EXCL, never through a symlink): data extents only, so holes stay holes, copied
    in the kernel (``copy_file_range``: a reflink where the file system shares extents),
    else, across file systems (EXDEV since Linux 5.19), read and written here.
    Not fsynced: the callers' copies are work files made durable, if ever, later."""
    src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.open(target, CREATE_FLAGS, PRIVATE)
        try:
            size, offset = os.fstat(src).st_size, 0
            in_kernel = True
            while offset < size:
                try:
                    start = os.lseek(src, offset, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # nothing but a hole left
                        break
                    raise
                end = os.lseek(src, start, os.SEEK_HOLE)
                while start < end:
                    if in_kernel:
                        try:
                            copied = os.copy_file_range(src, dst, end - start, start, start)
                        except OSError as exc:
                            if exc.errno not in _NO_KERNEL_COPY:
                                raise
                            in_kernel = False
                            continue
                    else:
                        copied = os.pwrite(dst, os.pread(src, min(end - start, 1 << 20), start),
                                           start)
                    if copied == 0:
                        raise OSError(errno.EIO, f"{source.name} ended while being copied")
                    start += copied
                offset = end
            os.ftruncate(dst, size)
        finally:
            os.close(dst)
    finally:
        os.close(src)


# copy_file_range cannot copy between these two files (another file system, or none of
# its own): the copy is read and written in this process instead.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def fsync_directory(directory: Path) -> None:
    """Make a rename inside *directory* durable."""
    with OutputDir(directory) as opened:
        opened.sync()


def read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of the regular file *path* (at most *limit*), None when there is none;
    never through a symlink, never blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidInputError(f"{path} is a symlink; bbsnap does not read through it"
                                    ) from exc
        raise
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise InvalidInputError(f"{path} is not a regular file")
        return handle.read(limit)
