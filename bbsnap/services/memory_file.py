"""A memory snapshot's stored file: libvirt's save image, compressed by bbsnap.

zstd level 1 since this session; ISA-L gzip level 1 before (``.memory.gz`` files of older
images are still read). Measured on the tiny guest's save images (109 MiB at 256 MiB of
RAM, 121 MiB at 1 GiB: QEMU sends zero pages as a few bytes, so the image grows with what
the guest used, not with its RAM size), one core, the host shared:

    format          size      compress   unpack
    ISA-L gzip -1   44.8 MiB  0.7-1.1 s  0.44-1.0 s   (gzip -dc: 0.95-1.55 s)
    zstd -1         44.0 MiB  0.65-1.3 s 0.20-0.47 s

The unpack is on a revert's path (the guest waits for it), the compression is not (the
worker does it while the guest runs): zstd is as small, as fast to write and 2-3x faster
to read. libvirt's own compressed save formats (qemu.conf ``save_image_format``: gzip,
bzip2, xz, lzop in libvirt 9.0; zstd only from 10.x) decompress through an external
program during the restore: a save image rewritten here as libvirt's gzip format restored
in 1.83-1.93 s against 0.60-1.08 s for the raw image (``gzip -dc`` is the bottleneck), so
bbsnap unpacks itself. The file is 0600: it holds the guest's secrets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import isal.igzip as igzip

from bbsnap import safe_files
from bbsnap.errors import InvalidInputError
from bbsnap.state.layout import FILE_MODE

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[no-redef, unused-ignore]

SUFFIX = ".memory.zst"
LEVEL = 1          # zstd's fastest standard level: a saved RAM is mostly zero pages and code
CHUNK = 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def pack(raw: Path, partial: Path, final: Path) -> int:
    """Compress the save file *raw* into *final* (written as *partial*, then renamed);
    the stored size."""
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    compressor = zstd.ZstdCompressor(level=LEVEL)
    with os.fdopen(fd, "wb") as sink, raw.open("rb") as source:
        while chunk := source.read(CHUNK):
            sink.write(compressor.compress(chunk))
        sink.write(compressor.flush())
    safe_files.publish(partial, final, mode=FILE_MODE)
    return final.stat().st_size


def unpack(stored: Path, dest: Path) -> None:
    """The save file back from *stored* (zstd, or gzip for older images) into a new *dest*
    (0600); a damaged file is refused with a clear message and *dest* removed."""
    reader = _reader(stored)
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    except BaseException:
        reader.close()
        raise
    try:
        with os.fdopen(fd, "wb") as sink, reader as source:
            while chunk := source.read(CHUNK):
                sink.write(chunk)
    except (OSError, EOFError, zstd.ZstdError) as exc:
        dest.unlink(missing_ok=True)
        raise InvalidInputError(f"the memory file of image {stored.name} cannot be read: "
                                f"{exc}") from exc


def _reader(stored: Path) -> BinaryIO:
    try:
        with stored.open("rb") as probe:
            magic = probe.read(4)
    except OSError as exc:
        raise InvalidInputError(f"the memory file of image {stored.name} cannot be read: "
                                f"{exc}") from exc
    if magic.startswith(_GZIP_MAGIC):
        return igzip.open(stored, "rb")  # type: ignore[no-any-return, unused-ignore]
    if magic == _ZSTD_MAGIC:
        return zstd.open(stored, "rb")  # type: ignore[no-any-return, unused-ignore]
    raise InvalidInputError(f"the memory file of image {stored.name} is neither zstd nor "
                            "gzip")
