import io
import struct

import pytest

from bbsnap.transfer.compression import Compression, DecompressingReader, sniff_compression
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
    ({"backing": (1 << 63, 10)}, "backing file"),  # seek() raised OverflowError here
    ({"backing": ((1 << 64) - 1, 10)}, "backing file"),
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
                                       (b"KDMV" + bytes(600), "VMDK"),
                                       (b"vhdxfile" + bytes(600), "VHDX")])
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


# --- a stated format, the sidecar's statements, the head's bounds -----------------------------

@pytest.mark.parametrize("head", [b"QFI\xfb" + bytes(100), b"hello world" * 100,
                                  b"KDMV" + bytes(600), bytes(4096)])
def test_stated_raw_is_raw_whatever_the_bytes_look_like(head):
    """Opened with -f raw only, the bytes are guest data: no partition-table heuristic."""
    assert detect_format(head, "raw").name == "raw"


def test_stated_raw_still_refuses_nothing_at_all():
    with pytest.raises(InvalidInputError, match="empty"):
        detect_format(b"", "raw")


def test_stated_qcow2_needs_the_qcow2_magic():
    assert detect_format(b"QFI\xfb" + bytes(100), "qcow2").name == "qcow2"
    with pytest.raises(InvalidInputError, match="the sidecar says qcow2"):
        detect_format(bytes(510) + b"\x55\xaa", "qcow2", stated_by="the sidecar")


def test_unknown_stated_format_is_refused():
    with pytest.raises(InvalidInputError, match="vmdk"):
        detect_format(bytes(512), "vmdk")


def _sidecar_bytes(**fields) -> bytes:
    import json

    return json.dumps({"bbsnap_sidecar": 1, "name": "n", "virtual_size": 1, **fields}).encode()


def test_sidecar_without_format_or_compression_states_neither():
    from bbsnap.transfer import sidecar

    meta = sidecar.parse(_sidecar_bytes())
    assert (meta.format, meta.compression) == (None, None)
    meta = sidecar.parse(_sidecar_bytes(format="raw", compression="none"))
    assert (meta.format, meta.compression) == ("raw", "none")


@pytest.mark.parametrize("field,value", [("format", "vmdk"), ("compression", "lz4"),
                                         ("format", 7)])
def test_sidecar_with_an_unknown_format_or_compression_is_refused(field, value):
    from bbsnap.transfer import sidecar

    with pytest.raises(InvalidInputError, match=field):
        sidecar.parse(_sidecar_bytes(**{field: value}))


def test_qcow2_bound_grows_with_the_virtual_size_and_stays_near_it():
    from bbsnap.disks.qcow2_header import Qcow2Header

    small = Qcow2Header(3, 1 << 20, 16, 0, 0).max_file_size()
    assert 1 << 20 < small < 8 << 20  # a 1 MiB disk: a few MiB, not GiBs
    big = Qcow2Header(3, 1 << 40, 16, 0, 0).max_file_size()
    assert 1 << 40 < big < (1 << 40) * 1.1
    assert Qcow2Header(3, 1 << 30, 9, 0, 0, refcount_order=6).max_file_size() > 1 << 30


def test_copy_refuses_a_head_before_creating_the_file(tmp_path):
    from bbsnap.transfer.stream import copy_decompressed

    def refuse(head: bytes):
        raise InvalidInputError(f"refused after {len(head)} bytes")

    with pytest.raises(InvalidInputError, match="refused after 1024 bytes"):
        copy_decompressed(io.BytesIO(bytes(4096)), tmp_path / "out", max_output=1 << 30,
                          check_head=refuse, head_size=1024)
    assert not (tmp_path / "out").exists()


def test_copy_stops_at_the_heads_limit(tmp_path):
    from bbsnap.transfer.stream import OutputLimit, copy_decompressed

    with pytest.raises(HostileImageError, match="too long"):
        copy_decompressed(io.BytesIO(b"\x01" * (3 << 20)), tmp_path / "out", max_output=1 << 30,
                          check_head=lambda head: OutputLimit(2 << 20, "too long"))


def test_stated_compression_is_used_and_checked(tmp_path):
    import gzip

    from bbsnap.transfer.stream import copy_decompressed

    data = b"\x1f\x8b" + bytes(1000)  # gzip's magic, not gzip
    copied = copy_decompressed(io.BytesIO(data), tmp_path / "a", max_output=1 << 20,
                               compression=Compression.NONE)
    assert copied.output_bytes == len(data) and (tmp_path / "a").read_bytes() == data
    with pytest.raises(InvalidInputError, match="says the file is xz-compressed"):
        copy_decompressed(io.BytesIO(gzip.compress(data)), tmp_path / "b", max_output=1 << 20,
                          compression=Compression.XZ)


def test_the_header_reports_its_extensions_in_order():
    extensions = struct.pack(">II", 0xE2792ACA, 5) + b"qcow2\0\0\0" + \
        struct.pack(">II", 0x6803F857, 0)
    header = read_qcow2_header(io.BytesIO(_qcow2_header(extensions=extensions)),
                               max_virtual_size=1 << 30)
    assert header.extensions == (0xE2792ACA, 0x6803F857)


def test_a_copy_keeps_its_bytes_and_leaves_holes_for_zero_blocks(tmp_path):
    from bbsnap.transfer.stream import copy_decompressed

    block = 64 * 1024
    # data runs of several blocks, zero blocks between them, a short zero tail
    data = (b"\x01" * 3 * block + bytes(8 * block) + b"\x02" * (block + 5) +
            bytes(block - 5) + bytes(16 * block) + b"\x03" * 7 + bytes(100))
    copied = copy_decompressed(io.BytesIO(data), tmp_path / "out", max_output=1 << 30,
                               compression=Compression.NONE, writeback_every=block)
    out = tmp_path / "out"
    assert copied.output_bytes == len(data) and out.read_bytes() == data
    assert out.stat().st_blocks * 512 < len(data) // 2  # the zero blocks are holes
