"""The initramfs contents and their newc cpio archive.

The archive is written here rather than by ``cpio``, so that ownership is root
and /dev/console can be a device node without the builder being root, and the
output is reproducible (fixed inode order, no timestamps).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import field

from bbsnap.lazy_dataclass import dataclass

_S_IFDIR, _S_IFREG, _S_IFLNK, _S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000
_S_IFMT = 0o170000


@dataclass
class Initramfs:
    """Files of the initramfs, by path inside it (no leading slash)."""

    files: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    chardevs: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Directories that must exist even if empty, or need a mode other than 0755.
    dirs: dict[str, int] = field(default_factory=dict)

    def add(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.files[path.lstrip("/")] = (mode, data)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self.dirs[path.strip("/")] = mode

    def paths(self) -> list[str]:
        """Every explicitly added path, sorted (what the build manifest lists)."""
        return sorted({*self.files, *self.symlinks, *self.chardevs, *self.dirs})


def cpio_newc(initramfs: Initramfs) -> bytes:
    """*initramfs* as a newc archive, with every parent directory made explicit."""
    entries: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    for path in initramfs.paths():
        for parent in _parents(path):
            entries.setdefault(parent, (_S_IFDIR | 0o755, b"", (0, 0)))
    for path, mode in initramfs.dirs.items():
        entries[path] = (_S_IFDIR | mode, b"", (0, 0))
    for path, (mode, data) in initramfs.files.items():
        entries[path] = (_S_IFREG | mode, data, (0, 0))
    for path, target in initramfs.symlinks.items():
        entries[path] = (_S_IFLNK | 0o777, target.encode(), (0, 0))
    for path, rdev in initramfs.chardevs.items():
        entries[path] = (_S_IFCHR | 0o600, b"", rdev)
    out = bytearray()
    # Sorting by components puts each directory before its contents.
    for ino, path in enumerate(sorted(entries, key=lambda p: p.split("/")), start=1):
        mode, data, rdev = entries[path]
        out += _cpio_entry(path, ino, mode, data, rdev)
    out += _cpio_entry("TRAILER!!!", 0, 0, b"", (0, 0))
    return bytes(out)


def _parents(path: str) -> Iterator[str]:
    parts = path.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield "/".join(parts[:i])


def _cpio_entry(name: str, ino: int, mode: int, data: bytes, rdev: tuple[int, int]) -> bytes:
    encoded = name.encode() + b"\0"
    nlink = 2 if mode & _S_IFMT == _S_IFDIR else 1
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
    # namesize check
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    return _pad4(header + encoded) + _pad4(data)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)
