"""Recognise a disk image's format from its content, never from its file name.

A file that is neither qcow2 nor a plausible raw disk (partition table or a
known filesystem) is refused: treating arbitrary bytes as "raw" would register
text files and archives as bootable images.

When the user or an export's sidecar states the format, that wins over the
content: a raw disk may well begin with a qcow2 header (a nested guest's disk
image written to the start of the disk), and probing would re-import it as that
inner qcow2.
"""

from __future__ import annotations

from bbsnap.lazy_dataclass import dataclass

from bbsnap.errors import InvalidInputError
from bbsnap.vocabulary import DiskFormat, values

QCOW2_MAGIC = b"QFI\xfb"
PROBE_BYTES = 68 * 1024  # enough to reach the btrfs superblock magic at 64 KiB + 64
FORMATS = values(DiskFormat)  # what a user or a sidecar may state

# Formats QEMU knows that bbsnap does not import; named so the error can say what to do.
_OTHER_FORMATS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"KDMV", "VMDK"),
    (0, b"# Disk DescriptorFile", "VMDK"),
    (0x40, b"\x7f\x10\xda\xbe", "VDI"),
    (0, b"vhdxfile", "VHDX"),
    (0, b"conectix", "VHD"),
    (0, b"QED\x00", "QED"),
    (0, b"LUKS\xba\xbe", "LUKS"),
    (0, b"PK\x03\x04", "zip archive"),
    (0, b"7z\xbc\xaf\x27\x1c", "7-zip archive"),
    (257, b"ustar", "tar archive"),
)

# (offset, magic, what): signatures that make raw bytes believable as a disk.
_RAW_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (510, b"\x55\xaa", "boot sector / partition table"),
    (512, b"EFI PART", "GPT partition table"),
    (1080, b"\x53\xef", "ext2/3/4 filesystem"),
    (0, b"XFSB", "XFS filesystem"),
    (32769, b"CD001", "ISO 9660 filesystem"),
    (65600, b"_BHRfS_M", "btrfs filesystem"),
    (0, b"hsqs", "squashfs filesystem"),
    (4086, b"SWAPSPACE2", "swap area"),
)


@dataclass(frozen=True)
class DetectedFormat:
    name: str      # "qcow2" or "raw"
    evidence: str  # why we believe it


def detect_format(head: bytes, stated: str | None = None, *,
                  stated_by: str = "--disk-format") -> DetectedFormat:
    """The format of an image whose first bytes are *head* (up to PROBE_BYTES).

    *stated* ("raw" or "qcow2", by *stated_by*) replaces the guess by content; a
    stated qcow2 must still have the qcow2 magic.
    """
    if not head:
        raise InvalidInputError("the image is empty (0 bytes)")
    if stated is not None:
        return _as_stated(head, stated, stated_by)
    if head.startswith(QCOW2_MAGIC):
        return DetectedFormat("qcow2", "qcow2 magic")
    for offset, magic, name in _OTHER_FORMATS:
        if head[offset:offset + len(magic)] == magic:
            raise InvalidInputError(
                f"the file is a {name}, which bbsnap does not import",
                hint="convert it to qcow2 or raw first, e.g. with qemu-img convert -O qcow2")
    for offset, magic, name in _RAW_SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return DetectedFormat("raw", name)
    raise InvalidInputError(
        "the file is not a disk image: no qcow2 header, partition table or filesystem found",
        hint="import a qcow2 or raw disk image, optionally gzip/xz/zstd/bzip2 compressed")


def _as_stated(head: bytes, stated: str, stated_by: str) -> DetectedFormat:
    if stated == "qcow2":
        if not head.startswith(QCOW2_MAGIC):
            raise InvalidInputError(f"{stated_by} says qcow2, but the data has no qcow2 header",
                                    hint="state the format it has, or leave it out to detect it")
        return DetectedFormat("qcow2", f"qcow2 magic, as {stated_by} says")
    if stated == "raw":
        # No partition-table or filesystem heuristic: those guard against registering a text
        # file that nobody called a disk. Stated raw bytes are opened with `-f raw` only, so
        # whatever they contain (a qcow2 header, a VMDK) is guest data and names no host file.
        return DetectedFormat("raw", f"stated by {stated_by}")
    raise InvalidInputError(f"{stated_by} names the disk format {stated!r}, which bbsnap does "
                            f"not import", hint=f"use one of: {', '.join(FORMATS)}")
