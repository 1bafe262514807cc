import io
import struct

import pytest

from bbsnap.compression import Compression, DecompressingReader, sniff_compression
from bbsnap.disks.formats import detect_format
from bbsnap.disks.qcow2_header import read_qcow2_header
from bbsnap.errors import HostileImageError, InvalidInputError


def _qcow2_header(version=3, backing=(0, 0), crypt=0, incompatible=0, size=1 << 20,
                  extensions=b"") -> bytes:
    header = b"QFI\xfb" + struct.pack(">IQIIQIIQQIIQ", version, backing[0], backing[1], 16, size,
                                      crypt, 1, 0x30000, 0x10000, 1, 0, 0)
    if version == 3:
        header += struct.pack(">QQQII", incompatible, 0, 0, 4, 104)
    return header + extensions + struct.pack(">II", 0, 0) + bytes(512)


def test_a_clean_v3_header_is_accepted():
    header = read_qcow2_header(io.BytesIO(_qcow2_header()), max_virtual_size=1 << 30)
    assert (header.version, header.virtual_size) == (3, 1 << 20)


@pytest.mark.parametrize("kwargs,words", [
    ({"backing": (200, 10)}, "backing file"),
    ({"crypt": 2}, "encrypted"),
    ({"incompatible": 1 << 2}, "external data file"),
    ({"incompatible": 1 << 1}, "corrupt"),
    ({"incompatible": 1 << 9}, "unknown incompatible"),
    ({"size": 1 << 41}, "over the limit"),
    ({"version": 4}, "version"),
    ({"extensions": struct.pack(">II", 0x44415441, 8) + b"/etc/pwd"}, "external data file"),
    ({"extensions": struct.pack(">II", 0x0537BE77, 16) + bytes(16)}, "encrypted"),
])
def test_unsafe_headers_are_refused(kwargs, words):
    with pytest.raises(HostileImageError, match=words):
        read_qcow2_header(io.BytesIO(_qcow2_header(**kwargs)), max_virtual_size=1 << 40)


def test_truncated_header_is_refused():
    with pytest.raises(HostileImageError):
        read_qcow2_header(io.BytesIO(b"QFI\xfb\x00\x00"), max_virtual_size=1 << 30)


@pytest.mark.parametrize("head,expected", [
    (b"QFI\xfb" + bytes(100), "qcow2"),
    (bytes(510) + b"\x55\xaa", "raw"),
    (bytes(1080) + b"\x53\xef" + bytes(10), "raw"),
    (bytes(32769) + b"CD001", "raw"),
])
def test_format_detection(head, expected):
    assert detect_format(head).name == expected


@pytest.mark.parametrize("head,words", [(b"", "empty"), (b"hello world" * 100, "not a disk image"),
                                       (b"KDMV" + bytes(600), "VMDK"), (b"vhdxfile" + bytes(600), "VHDX")])
def test_format_refusals(head, words):
    with pytest.raises(InvalidInputError, match=words):
        detect_format(head)


def test_sniffing_compression():
    assert sniff_compression(b"\x1f\x8b\x08") is Compression.GZIP
    assert sniff_compression(b"\xfd7zXZ\x00") is Compression.XZ
    assert sniff_compression(b"\x28\xb5\x2f\xfd") is Compression.ZSTD
    assert sniff_compression(b"BZh9") is Compression.BZIP2
    assert sniff_compression(b"QFI\xfb") is Compression.NONE


def test_reads_are_bounded_even_for_a_bomb():
    import gzip

    reader = DecompressingReader(io.BytesIO(gzip.compress(bytes(50 << 20))), Compression.GZIP)
    sizes = [len(reader.read(4096)) for _ in range(100)]
    assert max(sizes) <= 4096 and sum(sizes) == 409600


def test_multi_member_gzip_with_padding_and_trailing_garbage():
    import gzip

    data = gzip.compress(b"a" * 1000) + gzip.compress(b"b") + bytes(64)
    reader = DecompressingReader(io.BytesIO(data), Compression.GZIP)
    assert b"".join(iter(lambda: reader.read(100), b"")) == b"a" * 1000 + b"b"
    reader = DecompressingReader(io.BytesIO(gzip.compress(b"a") + b"junk"), Compression.GZIP)
    with pytest.raises(InvalidInputError, match="trailing garbage"):
        b"".join(iter(lambda: reader.read(100), b""))
