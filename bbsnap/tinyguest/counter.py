"""The tiny guest's disk counter, read from the host side.

The guest keeps one 512-byte sector of ``/dev/vda`` at :data:`COUNTER_OFFSET`
(in the gap between the MBR and partition 1, so no filesystem is involved):
ASCII ``BBSNAPCTR <decimal>\\n`` padded with NULs. It continues from the value it
finds at boot, so a clone of a snapshot proves which point in time it holds.
"""

from __future__ import annotations

import re
from pathlib import Path

from bbsnap.errors import ExternalCommandError
from bbsnap.proc import run, which

SECTOR_SIZE = 512
COUNTER_OFFSET = 512 * 1024          # sector 1024; partition 1 starts at 1 MiB
COUNTER_SECTOR = COUNTER_OFFSET // SECTOR_SIZE
COUNTER_MAGIC = b"BBSNAPCTR "

# "00080000:  42 42 53 ...  BBSNAPCTR.1..." — exactly 16 hex bytes per line; the
# ASCII column can itself look like hex, so the byte count is fixed, not greedy.
_DUMP_LINE = re.compile(r"^([0-9a-f]{8}):  ((?:[0-9a-f]{2} ){15}[0-9a-f]{2})")
_VALUE = re.compile(rb"BBSNAPCTR ([0-9]+)\n")


def encode_counter_sector(value: int) -> bytes:
    """The sector the guest writes for *value* (also used by tests to fake one)."""
    if value < 0:
        raise ValueError("counter values are never negative")
    line = COUNTER_MAGIC + str(value).encode("ascii") + b"\n"
    return line.ljust(SECTOR_SIZE, b"\0")


def decode_counter_sector(sector: bytes) -> int | None:
    """The value in a counter sector, or None when the guest never wrote one."""
    match = _VALUE.match(sector)
    return int(match.group(1)) if match else None


def read_counter(disk: Path, fmt: str = "qcow2") -> int | None:
    """Counter value stored on *disk* (through its whole backing chain)."""
    return decode_counter_sector(read_disk_bytes(disk, COUNTER_OFFSET, SECTOR_SIZE, fmt))


def read_disk_bytes(disk: Path, offset: int, length: int, fmt: str = "qcow2") -> bytes:
    """*length* guest-visible bytes of *disk* at *offset* (a multiple of 16), via qemu-io.

    ``-U -r`` so it works while a guest still holds the image's write lock; the
    format is explicit so a raw file is never probed as something else.
    """
    if offset % 16 or length % 16 or length <= 0:
        raise ValueError("offset and length must be positive multiples of 16")
    argv = [which("qemu-io"), "-U", "-r", "-f", fmt, "-c", f"read -v {offset} {length}",
            str(disk)]
    result = run(argv, timeout=60, check=False)
    data = _parse_hexdump(result.stdout)
    if result.returncode != 0 or len(data) != length:
        # qemu-io reports a failed read (e.g. past the end) on stdout, not stderr.
        raise ExternalCommandError(
            f"could not read {length} bytes at {offset} of {disk}: "
            f"{result.stdout.strip() or result.stderr.strip() or 'no output'}",
            argv=argv, returncode=result.returncode, stderr=result.stderr)
    return data


def _parse_hexdump(text: str) -> bytes:
    data = bytearray()
    for line in text.splitlines():
        match = _DUMP_LINE.match(line)
        if match:
            data += bytes.fromhex(match.group(2))
    return bytes(data)
