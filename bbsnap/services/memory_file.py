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
import struct
from pathlib import Path
from typing import BinaryIO

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
VERIFY_CHUNK = 8 * CHUNK  # fewer, larger reads: the check is Python-loop bound
CRC_CHUNK = CHUNK  # the check frame's CRC: the buffer stays in the CPU's cache
# bbsnap's check frame at the end of a memory file (pack, verify): a zstd skippable frame
# (magic 0x184D2A50, its content's size) holding a tag, the CRC-32 and the length of the
# compressed bytes before it.
_SKIPPABLE_MAGIC = 0x184D2A50
_CHECK_TAG = b"BBCK"
_CHECK_FORMAT = "<II4sIQ"
_CHECK_LENGTH = struct.calcsize(_CHECK_FORMAT)
_CHECK_SIZE = _CHECK_LENGTH - 8
# What reading a damaged file raises, whichever the format.
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zstd.ZstdError)
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def pack(raw: Path, partial: Path, final: Path) -> int:
    """Compress the save file *raw* into *final* (written as *partial*, then renamed);
    the stored size. The file ends with bbsnap's check frame (``verify``)."""
    from isal import isal_zlib  # the check frame's CRC-32, as _crc_matches reads it

    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    # The frame's checksum lets a full read catch any damage, not only a truncation or a
    # broken entropy code; it costs the compression nothing measurable.
    compressor = zstd.ZstdCompressor(options={zstd.CompressionParameter.compression_level: LEVEL,
                                              zstd.CompressionParameter.checksum_flag: 1})
    crc, length = 0, 0
    with os.fdopen(fd, "wb") as sink, raw.open("rb") as source:
        while chunk := source.read(CHUNK):
            packed = compressor.compress(chunk)
            crc, length = isal_zlib.crc32(packed, crc), length + len(packed)
            sink.write(packed)
        packed = compressor.flush()
        crc, length = isal_zlib.crc32(packed, crc), length + len(packed)
        sink.write(packed)
        sink.write(_check_frame(crc, length))
    safe_files.publish(partial, final, mode=FILE_MODE)
    return final.stat().st_size


def _check_frame(crc: int, length: int) -> bytes:
    """A zstd skippable frame (decoders pass over it) holding the CRC-32 and length of
    every byte before it."""
    return struct.pack(_CHECK_FORMAT, _SKIPPABLE_MAGIC, _CHECK_SIZE, _CHECK_TAG, crc, length)


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
    except READ_ERRORS as exc:
        dest.unlink(missing_ok=True)
        raise InvalidInputError(f"the memory file of image {stored.name} cannot be read: "
                                f"{exc}") from exc


def open_stream(stored: Path) -> BinaryIO:
    """A reader of the save file inside *stored* (zstd, or gzip for older images)."""
    return _reader(stored)


def verify(stored: Path) -> None:
    """Refuse a damaged *stored* file with a clear message. A revert that streams the file
    into libvirt calls this before it stops the guest. A file ``pack`` wrote ends with a
    check frame: the CRC-32 of the compressed bytes (48 MiB: 0.016 s with ISA-L's CRC, 0.04 s
    with zlib's, against 0.11-0.2 s to decompress them); an older file is read whole,
    discarding what it holds (truncated, or failing zstd's or gzip's checksum)."""
    try:
        if _crc_matches(stored):
            return
        with _reader(stored) as source:
            while source.read(VERIFY_CHUNK):
                pass
    except READ_ERRORS as exc:
        raise InvalidInputError(f"the memory file of image {stored.name} cannot be read: "
                                f"{exc}") from exc


def _crc_matches(stored: Path) -> bool:
    """True if *stored* ends with a check frame its bytes match; False if it has none
    (older files: read whole instead); InvalidInputError if they do not match. ISA-L's
    CRC-32 (the same values as zlib's): 4 ms against zlib's 22 ms on 45 MiB here, on the
    revert's path before the guest is stopped."""
    from isal import isal_zlib  # 3 ms to import: only memory snapshots need it

    with stored.open("rb", buffering=0) as source:
        size = source.seek(0, os.SEEK_END)
        if size < _CHECK_LENGTH:
            return False
        source.seek(size - _CHECK_LENGTH)
        magic, frame_size, tag, crc, length = struct.unpack(_CHECK_FORMAT, source.read())
        if (magic, frame_size, tag) != (_SKIPPABLE_MAGIC, _CHECK_SIZE, _CHECK_TAG):
            return False
        source.seek(0)
        found, left = 0, size - _CHECK_LENGTH
        if left != length:
            raise InvalidInputError(f"the memory file of image {stored.name} is damaged: "
                                    f"{left} bytes where {length} were written")
        # Read into one reused buffer, cache-sized: 3.7 ms for a 45 MiB file against 10-12
        # ms reading a new 8 MiB bytes object each time (seventeenth session).
        buffer = memoryview(bytearray(CRC_CHUNK))
        while left and (got := source.readinto(buffer[:min(CRC_CHUNK, left)])):
            found, left = isal_zlib.crc32(buffer[:got], found), left - got
    if found != crc:
        raise InvalidInputError(f"the memory file of image {stored.name} is damaged: its "
                                "checksum does not match")
    return True


def read_chunk(source: BinaryIO, size: int = CHUNK) -> bytes:
    """The next chunk of *source* (``b""`` at its end); InvalidInputError if damaged."""
    try:
        return source.read(size)
    except READ_ERRORS as exc:
        raise InvalidInputError(f"the memory file cannot be read: {exc}") from exc


def _reader(stored: Path) -> BinaryIO:
    try:
        with stored.open("rb") as probe:
            magic = probe.read(4)
    except OSError as exc:
        raise InvalidInputError(f"the memory file of image {stored.name} cannot be read: "
                                f"{exc}") from exc
    if magic.startswith(_GZIP_MAGIC):
        import isal.igzip as igzip  # only images older than zstd: not on every import

        return igzip.open(stored, "rb")  # type: ignore[no-any-return, unused-ignore]
    if magic == _ZSTD_MAGIC:
        return zstd.open(stored, "rb")  # type: ignore[no-any-return, unused-ignore]
    raise InvalidInputError(f"the memory file of image {stored.name} is neither zstd nor "
                            "gzip")
