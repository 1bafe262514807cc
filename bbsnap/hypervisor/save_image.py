"""libvirt's QEMU save-image header, read from a stream (a memory revert restores from a FIFO).

``virDomainSaveImageGetXMLDesc`` reads the saved definition from a *file*; a revert that
streams the decompressed memory image into libvirt through a FIFO can read it only once,
so bbsnap reads the header itself from the start of the stream and feeds libvirt those same
bytes first. The layout is libvirt's on-disk ABI (src/qemu/qemu_saveimage.h, unchanged
since version 2 of the format in libvirt 0.9): a 16-byte magic, five 32-bit words (version,
data_len, was_running, compressed/format, cookieOffset) and 14 unused ones, in the saving
host's byte order (libvirt byte-swaps a header whose version looks too large); then
``data_len`` bytes holding the NUL-terminated domain XML and, from ``cookieOffset``, the
migration cookie; then QEMU's migration stream.
"""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from typing import BinaryIO

from bbsnap.lazy_dataclass import dataclass

MAGIC = b"LibvirtQemudSave"
PARTIAL = b"LibvirtQemudPart"   # a save libvirt had not finished writing
HEADER_SIZE = len(MAGIC) + 19 * 4
MAX_VERSION = 2
MAX_DATA = 64 * 1024 * 1024     # a definition and cookie, padded: tens of KiB in practice


class NotASaveImage(ValueError):
    """The stream does not start with a whole libvirt save-image header."""


@dataclass(frozen=True)
class Head:
    data: bytes          # every byte read: the header, the definition and the cookie
    definition: str      # the domain XML
    was_running: bool


def read_head(stream: BinaryIO) -> Head:
    """The header at the start of *stream*, which is left just after it."""
    header = _read_exactly(stream, HEADER_SIZE)
    magic = header[:len(MAGIC)]
    if magic == PARTIAL:
        raise NotASaveImage("the save was not finished (libvirt's partial-save header)")
    if magic != MAGIC:
        raise NotASaveImage("not a libvirt save image")
    order = "<"
    version = struct.unpack_from("<I", header, len(MAGIC))[0]
    if version > MAX_VERSION:  # saved on a host of the other byte order
        order = ">"
        version = struct.unpack_from(">I", header, len(MAGIC))[0]
    if not 1 <= version <= MAX_VERSION:
        raise NotASaveImage(f"unknown save-image version {version}")
    _, data_len, was_running, _, cookie_offset = struct.unpack_from(f"{order}5I", header,
                                                                    len(MAGIC))
    if not 0 < data_len <= MAX_DATA or cookie_offset > data_len:
        raise NotASaveImage(f"implausible definition length {data_len}")
    data = _read_exactly(stream, data_len)
    xml = data[:cookie_offset or data_len].split(b"\0", 1)[0]
    try:
        definition = xml.decode()
    except UnicodeDecodeError:
        raise NotASaveImage("the saved definition is not text") from None
    try:
        root = ET.fromstring(definition)
    except ET.ParseError:
        raise NotASaveImage("the saved definition is not XML") from None
    if root.tag != "domain":
        raise NotASaveImage("the saved definition is not a domain")
    return Head(data=header + data, definition=definition, was_running=bool(was_running))


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = b""
    while len(data) < size:  # a decompressing reader may hand out less than asked
        chunk = stream.read(size - len(data))
        if not chunk:
            break
        data += chunk
    if len(data) != size:
        raise NotASaveImage(f"it ends after {len(data)} of {size} header bytes")
    return data
