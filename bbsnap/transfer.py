"""Moving image bytes: hash what was read, decompress, write sparsely, cap the output.

One streaming pass over the source: the SHA-256 is of the bytes exactly as the
user supplied them (what a published SHA256SUMS lists), and the output file
gets holes where the data is zero so an 8 GiB mostly-empty disk stays small.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from .compression import Compression, check_cap, open_decompressed, sniff_compression
from .errors import ChecksumMismatchError, UsageError

CHUNK = 1 << 20
HOLE_BLOCK = 64 * 1024
_ZEROS = bytes(HOLE_BLOCK)
_CHECKSUM = re.compile(r"^sha256:([0-9a-fA-F]{64})$")

Progress = Callable[[int], None]  # called with bytes of source read so far


def parse_checksum(text: str) -> str:
    """Normalise ``sha256:HEX`` (the only algorithm accepted) to lowercase hex."""
    match = _CHECKSUM.match(text.strip())
    if not match:
        raise UsageError(f"'{text}' is not a checksum", hint="use sha256:<64 hex digits>")
    return match.group(1).lower()


class HashingReader:
    """Wraps a binary source; hashes and counts every byte read through it."""

    def __init__(self, source: BinaryIO, progress: Progress | None = None) -> None:
        self._source = source
        self._progress = progress
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0
        self._head = b""

    def peek(self, size: int) -> bytes:
        """The first *size* bytes without consuming them (reads them once, replays later)."""
        while len(self._head) < size:
            more = self._source.read(size - len(self._head))
            if not more:
                break
            self._head += more
        return self._head[:size]

    def read(self, size: int = CHUNK) -> bytes:
        if self._head:
            data, self._head = self._head[:size], self._head[size:]
        else:
            data = self._source.read(size)
        if data:
            self.sha256.update(data)
            self.bytes_read += len(data)
            if self._progress is not None:
                self._progress(self.bytes_read)
        return data


@dataclass(frozen=True)
class CopyResult:
    compression: Compression
    source_bytes: int
    source_sha256: str
    output_bytes: int


def copy_decompressed(source: BinaryIO, target: Path, *, max_output: int,
                      expected_sha256: str | None = None,
                      progress: Progress | None = None) -> CopyResult:
    """Write *source*'s (decompressed) bytes to the new file *target*, sparsely, and fsync it.

    Raises before returning if the stream is corrupt, truncated, expands past
    *max_output*, or does not match *expected_sha256*; the caller removes *target*.
    """
    reader = HashingReader(source, progress)
    kind = sniff_compression(reader.peek(8))
    data = open_decompressed(reader, kind)  # type: ignore[arg-type]
    produced = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            chunk = data.read(CHUNK)
            if not chunk:
                break
            produced += len(chunk)
            check_cap(produced, max_output)
            _write_sparse(fd, chunk)
        # Drain any bytes after the compressed stream so the digest covers the whole file.
        while reader.read(CHUNK):
            pass
        os.ftruncate(fd, produced)
        os.fsync(fd)
    finally:
        os.close(fd)
    digest = reader.sha256.hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise ChecksumMismatchError(
            f"checksum mismatch: the data has sha256:{digest}, expected sha256:{expected_sha256}",
            hint="the download is damaged or not the file you meant; nothing was imported")
    return CopyResult(kind, reader.bytes_read, digest, produced)


def _write_sparse(fd: int, chunk: bytes) -> None:
    view = memoryview(chunk)
    for start in range(0, len(view), HOLE_BLOCK):
        block = view[start:start + HOLE_BLOCK]
        if len(block) == HOLE_BLOCK and block == _ZEROS:
            os.lseek(fd, HOLE_BLOCK, os.SEEK_CUR)
        else:
            while block:  # os.write may write less than asked
                block = block[os.write(fd, block):]


def fsync_file(path: Path) -> None:
    """Flush a finished file's data to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make a rename inside *directory* durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
