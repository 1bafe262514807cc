"""Compressed streams, recognised by their magic bytes and decoded with a hard output cap.

Decoders never trust size trailers (a gzip trailer holds the size modulo 4 GiB
and is attacker-written anyway): output is counted as it is produced, each read
is bounded, and a stream that ends before its end-of-stream marker is an error.
"""

from __future__ import annotations

import bz2
import enum
import lzma
from typing import BinaryIO, Callable, Protocol

from bbsnap.errors import HostileImageError, InvalidInputError

XZ_MEMLIMIT = 512 * 1024 * 1024  # xz -9 needs 65 MiB; a crafted dictionary size could ask for GBs


class Compression(str, enum.Enum):
    NONE = "none"
    GZIP = "gzip"
    XZ = "xz"
    ZSTD = "zstd"
    BZIP2 = "bzip2"


_MAGICS: tuple[tuple[bytes, Compression], ...] = (
    (b"\x1f\x8b", Compression.GZIP),
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
    (b"BZh", Compression.BZIP2),
)


def sniff_compression(head: bytes) -> Compression:
    for magic, kind in _MAGICS:
        if head.startswith(magic):
            return kind
    return Compression.NONE


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = ...) -> bytes: ...


class _ZlibAdapter:
    """zlib keeps unconsumed input in ``unconsumed_tail``; fold it back in like lzma/bz2 do."""

    def __init__(self) -> None:
        try:
            from isal import isal_zlib as zlib_impl  # ISA-L: several times faster inflate
        except ImportError:  # pragma: no cover - isal is a declared dependency
            import zlib as zlib_impl  # type: ignore[no-redef]
        self._obj = zlib_impl.decompressobj(wbits=31)  # 31: gzip wrapper, one member
        self._tail = b""

    @property
    def eof(self) -> bool:
        return bool(self._obj.eof)

    @property
    def unused_data(self) -> bytes:
        return bytes(self._obj.unused_data)

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        out = self._obj.decompress(self._tail + data, max_length)
        self._tail = bytes(self._obj.unconsumed_tail)
        return out


def _zstd_decompressor() -> _Decompressor:
    # The stdlib module (3.14+) or its backport: unlike the zstandard package it
    # bounds output per call (max_length) and reports eof, so truncation is seen.
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd  # type: ignore[no-redef, unused-ignore]
    return zstd.ZstdDecompressor()  # type: ignore[no-any-return]


_FACTORIES: dict[Compression, Callable[[], _Decompressor]] = {
    Compression.GZIP: _ZlibAdapter,
    Compression.ZSTD: _zstd_decompressor,
    Compression.XZ: lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT),
    Compression.BZIP2: bz2.BZ2Decompressor,
}


class DecompressingReader:
    """``read(n)`` returns at most *n* decompressed bytes; b"" only at a clean end of stream.

    Concatenated streams (multi-member gzip, several xz streams) are decoded in
    turn, and NUL padding between or after them is skipped, as gunzip/xz do.
    """

    def __init__(self, source: BinaryIO, kind: Compression, chunk_size: int = 1 << 20) -> None:
        self._source = source
        self._kind = kind
        self._chunk = chunk_size
        self._factory = _FACTORIES[kind]
        self._decoder: _Decompressor | None = self._factory()
        self._pending = b""        # input read but not yet given to the decoder
        self._drained = True       # the decoder has no buffered output for an empty feed

    def read(self, size: int) -> bytes:
        try:
            return self._read(size)
        except InvalidInputError:
            raise
        except Exception as exc:  # each library has its own error class (IsalError, ZstdError ...)
            raise InvalidInputError(f"the {self._kind.value} data is corrupt: {exc}") from exc

    def _read(self, size: int) -> bytes:
        while self._decoder is not None:
            decoder = self._decoder
            if decoder.eof:
                if not self._start_next_stream(decoder.unused_data):
                    return b""
                continue
            if self._pending:
                data, self._pending = self._pending, b""
            elif self._drained:
                data = self._source.read(self._chunk)
                if not data:
                    raise InvalidInputError(
                        f"the {self._kind.value} stream is truncated (it ends before its "
                        "end-of-stream marker)")
            else:
                data = b""
            out = decoder.decompress(data, size)
            # A full read may leave output inside the decoder: ask again with no input.
            self._drained = len(out) < size
            if out:
                return out
        return b""

    def _start_next_stream(self, leftover: bytes) -> bool:
        data = leftover
        while True:
            data = data.lstrip(b"\x00")
            if data:
                break
            data = self._source.read(self._chunk)
            if not data:
                self._decoder = None
                return False
        if not data.startswith(next(m for m, k in _MAGICS if k is self._kind)):
            raise InvalidInputError(f"trailing garbage after the {self._kind.value} stream")
        self._decoder = self._factory()
        self._pending = data
        self._drained = True
        return True


def open_decompressed(source: BinaryIO, kind: Compression) -> BinaryIO:
    """A reader of *source*'s decompressed bytes (the source itself when not compressed)."""
    if kind is Compression.NONE:
        return source
    return DecompressingReader(source, kind)  # type: ignore[return-value]


def check_cap(produced: int, cap: int) -> None:
    if produced > cap:
        raise HostileImageError(
            f"the compressed stream expands past the limit of {cap} bytes",
            hint="raise max_decompressed_size (BBSNAP_MAX_DECOMPRESSED_SIZE) if you trust it")
