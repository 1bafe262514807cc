"""A stored chain file as a registry layer: its bytes, with the backing name made relative.

A stored delta names its parent by file name inside images/ (``img-xxxxx.qcow2``),
which means nothing on another machine. Its layer names the parent *layer* instead
(``<hex of the parent layer's digest>.qcow2``, the parent layer's title), so standard
tools that put a pull's files side by side (``oras pull``) get a chain that resolves, and
bbsnap's puller knows exactly which file a layer may read. Only the name's bytes in the
header cluster change; the rest of the file is streamed as it is, so the same stored file
always gives the same layer (and digest): pushing a later snapshot finds its ancestors'
layers already in the repository.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from pathlib import Path

from bbsnap.errors import BbsnapError
from bbsnap.lazy_dataclass import dataclass
from bbsnap.registry.client import Readable

READ = 1 << 20


def title(digest: str) -> str:
    """A layer's file name: its digest's hex, then .qcow2."""
    return digest.split(":", 1)[1] + ".qcow2"


@dataclass
class LayerSource:
    """One chain file opened once (a prune that renames a new file over it meanwhile
    does not change what is read), its header cluster patched."""

    path: Path
    fd: int
    size: int
    head: bytes              # the patched first bytes, up to a cluster

    def opener(self) -> Callable[[int], Readable]:
        return lambda offset: _PatchedReader(self, offset)

    def digest(self, progress: Callable[[int], None] | None = None) -> str:
        sha, reader, done = hashlib.sha256(), _PatchedReader(self, 0), 0
        while chunk := reader.read(READ):
            sha.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done)
        return "sha256:" + sha.hexdigest()

    def close(self) -> None:
        os.close(self.fd)


def open_layer(path: Path, backing_name: str | None) -> LayerSource:
    """The layer for the stored qcow2 *path*, its backing name set to *backing_name*."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 104, 0)
        if len(head) < 72 or head[:4] != b"QFI\xfb":
            raise BbsnapError(f"{path.name} is not a qcow2 file")
        offset, length = struct.unpack(">QI", head[8:20])
        cluster_bits = struct.unpack(">I", head[20:24])[0]
        cluster = os.pread(fd, min(1 << cluster_bits, size), 0)
        return LayerSource(path, fd, size, _patched(cluster, offset, length, backing_name,
                                                   path))
    except BaseException:
        os.close(fd)
        raise


def _patched(cluster: bytes, offset: int, length: int, name: str | None, path: Path) -> bytes:
    out = bytearray(cluster)
    if not length:
        if name is not None:
            raise BbsnapError(f"{path.name} has no backing file, but its catalogue row a parent")
        return bytes(out)
    if name is None:
        raise BbsnapError(f"{path.name} has a backing file, but its catalogue row no parent")
    encoded = name.encode()
    end = offset + max(length, len(encoded))
    if end > len(out) or any(out[offset + length:end]):
        # bbsnap's own files keep the name last in the header cluster; anything else
        # would need the header rewritten by QEMU, not patched.
        raise BbsnapError(f"{path.name}: no room in its header for the backing name {name!r}")
    out[offset:offset + length] = bytes(length)
    out[offset:offset + len(encoded)] = encoded
    out[16:20] = struct.pack(">I", len(encoded))
    return bytes(out)


class _PatchedReader:
    """The layer's bytes from *offset*: the patched head, then the file as it is."""

    def __init__(self, source: LayerSource, offset: int) -> None:
        self._source, self._position = source, offset

    def read(self, size: int = READ) -> bytes:
        source, position = self._source, self._position
        if position >= source.size:
            return b""
        if position < len(source.head):
            data = source.head[position:position + size]
        else:
            data = os.pread(source.fd, min(size, source.size - position), position)
        self._position += len(data)
        return data
