"""Read a qcow2 header in Python, before any QEMU code touches the file.

A crafted qcow2 can name a backing file or an external data file pointing at
any host file (``/etc/shadow``, a ``json:`` pseudo-protocol, an NBD server);
qemu-img would then read that file into our catalogue. Those, encryption and
feature bits we don't understand are refused here, from the bytes alone.
Layout: QEMU's docs/interop/qcow2.txt (all fields big-endian).
"""

from __future__ import annotations

import struct
from bbsnap.lazy_dataclass import dataclass
from typing import BinaryIO

from bbsnap.errors import HostileImageError

# incompatible feature bits
DIRTY = 1 << 0
CORRUPT = 1 << 1
EXTERNAL_DATA_FILE = 1 << 2
COMPRESSION_TYPE = 1 << 3
EXTENDED_L2 = 1 << 4
KNOWN_INCOMPATIBLE = DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2
# compatible feature bits
LAZY_REFCOUNTS = 1 << 0

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441

MAX_HEADER_AREA = 1 << 20  # extensions must end inside the first cluster (≤ 2 MiB); be strict


# How much file a qcow2 may take beyond its data clusters, for leaked clusters (a crash
# between allocation and use), refcount tables that grew and moved, and the header area.
SLACK_CLUSTERS = 64
SLACK_FRACTION = 16  # ... plus 1/16 of the virtual size


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    virtual_size: int
    cluster_bits: int
    incompatible_features: int
    nb_snapshots: int
    compatible_features: int = 0
    refcount_order: int = 4  # v2 images: always 16-bit refcounts
    backing_file: str | None = None  # only ever the name the caller allowed
    autoclear_features: int = 0
    extensions: tuple[int, ...] = ()  # the header extensions' types, in file order

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & DIRTY)

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & EXTENDED_L2)

    def max_file_size(self) -> int:
        """The largest file an image with this header's active layer can need.

        What bounds an untrusted download: bytes past this are not the disk (a 6 KB
        bzip2 claiming 1 MiB must not write GiBs). Every guest cluster allocated, plus
        the L2 tables that map them (8-byte entries, 16 with extended L2), the L1 table,
        the refcount blocks and table covering all of that at the header's refcount
        width, and a slack. Internal snapshots are not budgeted: their clusters are
        dropped on import anyway, and an image carrying GiBs of them must be flattened.
        """
        cluster = 1 << self.cluster_bits
        data = _ceil_div(self.virtual_size, cluster)
        l2_tables = _ceil_div(data * (16 if self.extended_l2 else 8), cluster)
        l1 = _ceil_div(l2_tables * 8, cluster)
        counted = 1 + data + l2_tables + l1  # 1: the header cluster
        refcount_bits = 1 << min(self.refcount_order, 6)
        blocks = _ceil_div(counted * refcount_bits, cluster * 8)
        blocks += _ceil_div(blocks * refcount_bits, cluster * 8)  # blocks count themselves
        table = _ceil_div(blocks * 8, cluster)
        metadata = (counted - data + blocks + table + SLACK_CLUSTERS) * cluster
        return data * cluster + metadata + self.virtual_size // SLACK_FRACTION


def _ceil_div(value: int, divisor: int) -> int:
    return -(-value // divisor)


def read_qcow2_header(stream: BinaryIO, *, max_virtual_size: int,
                      allowed_backing: str | None = None) -> Qcow2Header:
    """Parse and vet the header of the qcow2 at *stream*; HostileImageError on anything unsafe.

    *allowed_backing*: the one backing file name accepted (a pulled chain layer names the
    layer below it); any other name, and any name when it is None, is refused."""
    stream.seek(0)
    base = stream.read(104)
    if len(base) < 72 or base[:4] != b"QFI\xfb":
        raise HostileImageError("the qcow2 header is truncated or has a wrong magic")
    (version, backing_offset, backing_size, cluster_bits, size, crypt_method,
     _l1_size, _l1_offset, _rt_offset, _rt_clusters, nb_snapshots,
     _snap_offset) = struct.unpack(">IQIIQIIQQIIQ", base[4:72])
    if version not in (2, 3):
        raise HostileImageError(f"unsupported qcow2 version {version}")
    backing = None
    if backing_offset or backing_size:
        name = _read_backing_name(stream, backing_offset, backing_size)
        if allowed_backing is not None and name == allowed_backing and \
                backing_offset + backing_size <= 1 << min(max(cluster_bits, 9), 21):
            backing = name
    if (backing_offset or backing_size) and backing is None:
        raise HostileImageError(
            f"the qcow2 image names a backing file ({name!r}); bbsnap refuses images "
            "that would read other files", hint="flatten it first: qemu-img convert -O qcow2")
    if crypt_method != 0:
        raise HostileImageError("the qcow2 image is encrypted; bbsnap imports only plain images")
    if not 9 <= cluster_bits <= 21:
        raise HostileImageError(f"the qcow2 cluster size 2^{cluster_bits} is invalid")
    if size > max_virtual_size:
        raise HostileImageError(
            f"the image's virtual size ({size} bytes) is over the limit of {max_virtual_size} "
            "bytes",
            hint="raise max_virtual_size (BBSNAP_MAX_VIRTUAL_SIZE) if you trust it")

    incompatible, compatible, autoclear, refcount_order, header_length = 0, 0, 0, 4, 72
    if version == 3:
        if len(base) < 104:
            raise HostileImageError("the qcow2 v3 header is truncated")
        incompatible, compatible, autoclear, refcount_order, header_length = struct.unpack(
            ">QQQII", base[72:104])
        if header_length < 104 or header_length > MAX_HEADER_AREA:
            raise HostileImageError(f"the qcow2 header length {header_length} is invalid")
        _vet_incompatible_features(incompatible)
    extensions = _vet_extensions(stream, header_length, 1 << cluster_bits)
    return Qcow2Header(version, size, cluster_bits, incompatible, nb_snapshots, compatible,
                       refcount_order, backing, autoclear, extensions)


def _vet_incompatible_features(bits: int) -> None:
    if bits & EXTERNAL_DATA_FILE:
        raise HostileImageError("the qcow2 image keeps its data in an external data file; "
                                "bbsnap refuses images that would read other files")
    if bits & CORRUPT:
        raise HostileImageError("the qcow2 image is marked corrupt",
                                hint="repair it with qemu-img check -r all first")
    unknown = bits & ~KNOWN_INCOMPATIBLE
    if unknown:
        raise HostileImageError(
            f"the qcow2 image uses unknown incompatible features (0x{unknown:x})")


def _vet_extensions(stream: BinaryIO, start: int, cluster_size: int) -> tuple[int, ...]:
    limit = min(cluster_size, MAX_HEADER_AREA)
    offset = start
    seen: list[int] = []
    while offset + 8 <= limit:
        stream.seek(offset)
        raw = stream.read(8)
        if len(raw) < 8:
            raise HostileImageError("the qcow2 header extensions are truncated")
        ext_type, length = struct.unpack(">II", raw)
        if ext_type == EXT_END:
            return tuple(seen)
        if ext_type == EXT_DATA_FILE:
            raise HostileImageError("the qcow2 image names an external data file; "
                                    "bbsnap refuses images that would read other files")
        if ext_type == EXT_ENCRYPTION:
            raise HostileImageError(
                "the qcow2 image is encrypted; bbsnap imports only plain images")
        seen.append(ext_type)
        offset += 8 + ((length + 7) & ~7)
    raise HostileImageError("the qcow2 header extensions run past the first cluster")


def _read_backing_name(stream: BinaryIO, offset: int, size: int) -> str:
    # The offset is a u64 from the file: one past what a file offset can be (2^63) made
    # seek() raise OverflowError instead of the refusal (found by the header fuzzer).
    if not size or size > 1023 or offset >= 1 << 62:
        return "<invalid>"
    stream.seek(offset)
    return stream.read(size).decode("utf-8", "replace")
