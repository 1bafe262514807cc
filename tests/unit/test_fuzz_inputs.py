"""Fuzzing (hypothesis, bounded): the untrusted-input front end never fails with anything but
bbsnap's own refusals, and never produces more than it was asked for."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bbsnap.transfer.compression import Compression, open_decompressed, sniff_compression
from bbsnap.disks.formats import detect_format
from bbsnap.disks.qcow2_header import read_qcow2_header
from bbsnap.errors import InvalidInputError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID_QCOW2 = (b"QFI\xfb" + struct.pack(">IQIIQIIQQIIQ", 3, 0, 0, 16, 1 << 20, 0, 1, 0x30000,
                                        0x10000, 1, 0, 0)
               + struct.pack(">QQQII", 0, 0, 0, 4, 104) + bytes(8) + bytes(400))


@FUZZ
@given(st.binary(max_size=4096))
def test_header_of_random_bytes(data):
    try:
        read_qcow2_header(io.BytesIO(b"QFI\xfb" + data), max_virtual_size=1 << 40)
    except InvalidInputError:
        pass  # HostileImageError is one


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_QCOW2) - 1), st.integers(0, 255)),
                max_size=12))
def test_header_with_mutated_fields(mutations):
    data = bytearray(VALID_QCOW2)
    for offset, value in mutations:
        data[offset] = value
    data[:4] = b"QFI\xfb"
    try:
        header = read_qcow2_header(io.BytesIO(bytes(data)), max_virtual_size=1 << 40)
    except InvalidInputError:
        return
    assert header.virtual_size <= 1 << 40 and 9 <= header.cluster_bits <= 21
    # The output bound derived from an accepted header: finite, and never below the disk.
    assert header.virtual_size <= header.max_file_size() <= 2 * header.virtual_size + (1 << 30)


@FUZZ
@given(st.binary(max_size=70 * 1024))
def test_format_detection_of_random_bytes(data):
    try:
        assert detect_format(data).name in ("qcow2", "raw")
    except InvalidInputError:
        pass


@FUZZ
@given(st.binary(max_size=4096), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1))
def test_boot_firmware_of_a_crafted_partition_table(code, entries_lba, count, size):
    """A protective MBR and a GPT header whose every number is hostile: a verdict, no error,
    no read outside the bytes given."""
    from bbsnap.disks.boot_firmware import needs_uefi
    import struct

    data = bytearray(code[:440].ljust(512, b"\0"))
    data[446 + 4] = 0xEE
    data[510:512] = b"\x55\xaa"
    header = bytearray(512)
    header[:8] = b"EFI PART"
    struct.pack_into("<QII", header, 72, entries_lba, count, size)
    assert needs_uefi(bytes(data + header + code)) in (True, False)


COMPRESSORS = {Compression.GZIP: gzip.compress, Compression.XZ: lzma.compress,
               Compression.BZIP2: bz2.compress}


@FUZZ
@given(st.sampled_from(sorted(COMPRESSORS, key=lambda c: c.value)), st.binary(max_size=20000),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       st.integers(0, 10**6))
def test_decompression_of_damaged_streams(kind, payload, mutations, cut):
    data = bytearray(COMPRESSORS[kind](payload))
    for offset, value in mutations:
        data[offset % len(data)] = value
    data = data[: max(1, cut % (len(data) + 1))]
    assert sniff_compression(bytes(data[:8])) in (kind, Compression.NONE)
    reader = open_decompressed(io.BytesIO(bytes(data)), kind)
    produced = 0
    try:
        while chunk := reader.read(4096):
            assert len(chunk) <= 4096
            produced += len(chunk)
            assert produced <= 16 * len(payload) + 4096
    except InvalidInputError:
        pass


@FUZZ
@given(st.sampled_from(sorted(COMPRESSORS, key=lambda c: c.value)), st.binary(max_size=4096),
       st.integers(1, 64), st.integers(0, 300_000), st.integers(1, 70_000))
def test_copy_never_writes_past_the_heads_limit(kind, payload, members, limit, head_size):
    """Whatever the (concatenated) stream, the file holds at most what the head allowed."""
    import tempfile
    from pathlib import Path

    from bbsnap.transfer.stream import OutputLimit, copy_decompressed

    data = COMPRESSORS[kind](payload) * members
    with tempfile.TemporaryDirectory() as directory:
        target = Path(directory) / "out"
        try:
            copied = copy_decompressed(io.BytesIO(data), target, max_output=1 << 30,
                                       check_head=lambda head: OutputLimit(limit, "past"),
                                       head_size=head_size)
        except InvalidInputError:
            assert not target.exists() or target.stat().st_size <= limit
            return
        assert copied.output_bytes == len(payload) * members <= limit
        assert target.stat().st_size == copied.output_bytes
