"""The hostile-input battery: each crafted input is refused with a one-line error and a
non-zero exit code, leaves no catalogue row and no file, and copies no host byte."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import struct
import subprocess
from pathlib import Path

import pytest

from tests.images import MIB, qcow2_disk, raw_disk, run

SECRET = b"BBSNAP-HOST-SECRET-" + b"s3cr3t" * 50


@pytest.fixture()
def secret_file(work_dir: Path) -> Path:
    """A host file a crafted image tries to read (stands in for /etc/shadow)."""
    path = work_dir / "host-secret"
    path.write_bytes(SECRET + bytes(MIB - len(SECRET)))
    return path


def assert_refused(bbsnap, result, *, exit_code: int | None = None, words: str = "") -> None:
    assert result.exit_code != 0, result.stdout
    if exit_code is not None:
        assert result.exit_code == exit_code, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("bbsnap: error:")]
    assert len(error_lines) == 1, result.stderr
    assert words.lower() in error_lines[0].lower(), error_lines[0]
    assert bbsnap.rows() == 0, "a catalogue row was left behind"
    assert bbsnap.files() == [], f"files were left behind: {bbsnap.files()}"


def assert_no_secret_copied(bbsnap) -> None:
    for path in bbsnap.data_dir.rglob("*"):
        if path.is_file():
            assert SECRET[:24] not in path.read_bytes(), f"host bytes copied into {path}"


def test_qcow2_with_backing_file_naming_a_host_file(bbsnap, work_dir, secret_file):
    evil = work_dir / "evil.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret_file), str(evil))
    assert_refused(bbsnap, bbsnap("images", "import", str(evil)), words="backing file")
    assert_no_secret_copied(bbsnap)


def test_qcow2_with_json_backing_file_name(bbsnap, work_dir, secret_file):
    evil = work_dir / "evil.qcow2"
    backing = ('json:{"driver":"raw","file":{"driver":"file","filename":"%s"}}' % secret_file)
    run("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", backing, str(evil), "1M")
    assert_refused(bbsnap, bbsnap("images", "import", str(evil)), words="backing file")
    assert_no_secret_copied(bbsnap)


def test_json_pseudo_file_name_as_source(bbsnap, secret_file):
    source = 'json:{"driver":"raw","file":{"driver":"file","filename":"%s"}}' % secret_file
    assert_refused(bbsnap, bbsnap("images", "import", source), exit_code=3, words="no such file")


def test_qcow2_with_external_data_file(bbsnap, work_dir, secret_file):
    evil = work_dir / "evil.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"data_file={secret_file},data_file_raw=on", str(evil), "1M")
    assert_refused(bbsnap, bbsnap("images", "import", str(evil)), words="external data file")
    assert_no_secret_copied(bbsnap)


def test_qcow2_with_unknown_incompatible_feature(bbsnap, work_dir):
    evil = qcow2_disk(work_dir / "evil.qcow2")
    with open(evil, "r+b") as handle:
        handle.seek(72)
        (bits,) = struct.unpack(">Q", handle.read(8))
        handle.seek(72)
        handle.write(struct.pack(">Q", bits | (1 << 40)))
    assert_refused(bbsnap, bbsnap("images", "import", str(evil)), words="unknown incompatible")


def test_qcow2_with_luks_encryption(bbsnap, work_dir):
    evil = work_dir / "enc.qcow2"
    # qemu-img times PBKDF2 to pick an iteration count and gives up ("Unable to get accurate
    # CPU usage") now and then on a loaded machine: that is the tool making our fixture, so retry.
    for attempt in range(5):
        try:
            run("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=pw",
                "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50",
                str(evil), "1M")
            break
        except subprocess.CalledProcessError:
            if attempt == 4:
                raise
    assert_refused(bbsnap, bbsnap("images", "import", str(evil)), words="encrypted")


def test_qcow2_with_legacy_aes_encryption_flag(bbsnap, work_dir):
    evil = qcow2_disk(work_dir / "aes.qcow2")
    with open(evil, "r+b") as handle:
        handle.seek(32)
        handle.write(struct.pack(">I", 1))
    assert_refused(bbsnap, bbsnap("images", "import", str(evil)), words="encrypted")


@pytest.mark.parametrize("maker", [raw_disk, qcow2_disk], ids=["raw", "qcow2"])
def test_virtual_size_over_the_configured_limit(bbsnap, work_dir, maker):
    big = maker(work_dir / "big.img", size=64 * MIB)
    result = bbsnap("images", "import", str(big), env={"BBSNAP_MAX_VIRTUAL_SIZE": "32M"})
    assert_refused(bbsnap, result, words="over the limit")


def test_compressed_stream_expanding_past_the_cap_despite_a_lying_trailer(bbsnap, work_dir):
    bomb = bytearray(gzip.compress(raw_disk(work_dir / "z.raw", size=64 * MIB).read_bytes()))
    bomb[-4:] = struct.pack("<I", 4096)  # the gzip size trailer claims 4 KiB
    source = work_dir / "bomb.gz"
    source.write_bytes(bytes(bomb))
    result = bbsnap("images", "import", str(source), env={"BBSNAP_MAX_DECOMPRESSED_SIZE": "16M"})
    assert_refused(bbsnap, result, words="expands past")


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress], ids=["gzip", "xz"])
def test_truncated_compressed_file(bbsnap, work_dir, compress):
    data = compress(raw_disk(work_dir / "t.raw").read_bytes())
    source = work_dir / "truncated"
    source.write_bytes(data[: len(data) // 2])
    assert_refused(bbsnap, bbsnap("images", "import", str(source)), words="truncated")


def test_corrupt_compressed_file(bbsnap, work_dir):
    data = bytearray(gzip.compress(raw_disk(work_dir / "c.raw").read_bytes()))
    for i in range(40, 60):
        data[i] ^= 0xFF
    source = work_dir / "corrupt.gz"
    source.write_bytes(bytes(data))
    assert_refused(bbsnap, bbsnap("images", "import", str(source)), words="corrupt")


def test_checksum_mismatch(bbsnap, work_dir):
    source = raw_disk(work_dir / "d.raw")
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    assert_refused(bbsnap, bbsnap("images", "import", str(source), "--checksum", wrong),
                   words="checksum mismatch")


def test_malformed_checksum_is_a_usage_error(bbsnap, work_dir):
    source = raw_disk(work_dir / "d.raw")
    assert_refused(bbsnap, bbsnap("images", "import", str(source), "--checksum", "md5:abc"),
                   exit_code=2, words="not a checksum")


@pytest.mark.parametrize("content", [b"just some text\n" * 1000, b"PK\x03\x04" + bytes(4096)],
                         ids=["text", "zip"])
def test_neither_disk_image_nor_known_compression(bbsnap, work_dir, content):
    source = work_dir / "notes.qcow2"
    source.write_bytes(content)
    assert_refused(bbsnap, bbsnap("images", "import", str(source)), words="not")


def test_directory(bbsnap, work_dir):
    assert_refused(bbsnap, bbsnap("images", "import", str(work_dir)), words="directory")


def test_missing_path(bbsnap, work_dir):
    assert_refused(bbsnap, bbsnap("images", "import", str(work_dir / "nope.qcow2")),
                   exit_code=3, words="no such file")


def test_empty_file(bbsnap, work_dir):
    source = work_dir / "empty.img"
    source.write_bytes(b"")
    assert_refused(bbsnap, bbsnap("images", "import", str(source)), words="empty")


def test_empty_stdin(bbsnap):
    assert_refused(bbsnap, bbsnap("images", "import", "-", input=b""), words="empty")


def test_compressed_empty_stream(bbsnap):
    assert_refused(bbsnap, bbsnap("images", "import", "-", input=gzip.compress(b"")), words="empty")
