"""Which firmware a disk can boot under, read from its partition table (untrusted bytes).

BIOS boots the boot code in the MBR's first 440 bytes; UEFI boots a loader from an EFI
system partition (ESP). Cloud images from Debian, Ubuntu and Fedora carry both (a GPT with a
BIOS boot partition and an ESP, and GRUB's code in the MBR), so they stay ``bios``. A disk
with an ESP and no MBR boot code can only boot under UEFI: that is the one case this module
reports, so a downloaded UEFI-only image gets OVMF without the user having to know.

Every offset and count comes from the image, so each is checked against the bytes read;
anything malformed means "no verdict", never an error or a read outside *data*.
"""

from __future__ import annotations

import struct
import uuid

SECTOR = 512
# Enough for the MBR, the GPT header and the usual 128 entries of 128 bytes from LBA 2.
READ_BYTES = 64 * 1024

MBR_CODE_SIZE = 440
MBR_TABLE = 446
MBR_TYPE_GPT_PROTECTIVE = 0xEE
MBR_TYPE_ESP = 0xEF
GPT_SIGNATURE = b"EFI PART"
ESP_GUID = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
MAX_GPT_ENTRIES = 1024


def needs_uefi(data: bytes) -> bool:
    """Whether a disk starting with *data* boots only under UEFI: an EFI system partition
    and no BIOS boot code."""
    if len(data) < SECTOR or data[510:512] != b"\x55\xaa":
        return False  # no partition table: nothing says how it boots
    if any(data[:MBR_CODE_SIZE]):
        return False  # BIOS boot code: SeaBIOS can boot it
    types = [data[MBR_TABLE + 16 * i + 4] for i in range(4)]
    if MBR_TYPE_ESP in types:
        return True
    if MBR_TYPE_GPT_PROTECTIVE in types:
        return ESP_GUID in _gpt_partition_types(data)
    return False


def _gpt_partition_types(data: bytes) -> set[uuid.UUID]:
    header = data[SECTOR:2 * SECTOR]
    if len(header) < 92 or header[:8] != GPT_SIGNATURE:
        return set()
    entries_lba, count, size = struct.unpack_from("<QII", header, 72)
    if size < 128 or size % 8 or count > MAX_GPT_ENTRIES:
        return set()
    types = set()
    for index in range(count):
        start = entries_lba * SECTOR + index * size
        if start + 16 > len(data):
            break  # entries past what was read: judge by those that were
        raw = data[start:start + 16]
        if any(raw):
            types.add(uuid.UUID(bytes_le=raw))
    return types
