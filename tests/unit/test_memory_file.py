"""The memory file's storage (services/memory_file.py): zstd now, gzip of older images read."""

from __future__ import annotations

import gzip
import os

import pytest

from bbsnap.errors import InvalidInputError
from bbsnap.services import memory_file
from bbsnap.services.memory_file import zstd

SAVE = b"LibvirtQemudSave" + bytes(range(256)) * 4096 + b"\0" * (1 << 21)


def test_pack_then_unpack_gives_the_save_image_back_private(tmp_path):
    raw = tmp_path / "raw.save"
    raw.write_bytes(SAVE)
    final = tmp_path / f"img-aaaaa{memory_file.SUFFIX}"
    size = memory_file.pack(raw, tmp_path / "partial", final)
    assert size == final.stat().st_size < len(SAVE) // 4
    assert final.read_bytes()[:4] == b"\x28\xb5\x2f\xfd", "a zstd frame"
    assert final.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "partial").exists()
    back = tmp_path / "back.save"
    memory_file.unpack(final, back)
    assert back.read_bytes() == SAVE
    assert back.stat().st_mode & 0o777 == 0o600


def test_an_older_images_gzip_memory_file_is_still_read(tmp_path):
    old = tmp_path / "img-aaaaa.memory.gz"
    old.write_bytes(gzip.compress(SAVE, 1))
    memory_file.unpack(old, tmp_path / "back.save")
    assert (tmp_path / "back.save").read_bytes() == SAVE


@pytest.mark.parametrize("content", [b"not compressed at all", b"\x28\xb5\x2f\xfd" + os.urandom(64),
                                     gzip.compress(SAVE)[:5000]])
def test_a_damaged_memory_file_is_refused_and_leaves_nothing(tmp_path, content):
    stored = tmp_path / f"img-aaaaa{memory_file.SUFFIX}"
    stored.write_bytes(content)
    dest = tmp_path / "back.save"
    with pytest.raises(InvalidInputError, match="memory file of image img-aaaaa"):
        memory_file.unpack(stored, dest)
    assert not dest.exists()


def test_unpack_never_writes_over_an_existing_file(tmp_path):
    raw = tmp_path / "raw.save"
    raw.write_bytes(SAVE)
    final = tmp_path / f"img-aaaaa{memory_file.SUFFIX}"
    memory_file.pack(raw, tmp_path / "partial", final)
    dest = tmp_path / "taken"
    dest.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        memory_file.unpack(final, dest)
    assert dest.read_bytes() == b"someone else's"


def test_verify_reads_a_whole_file_and_refuses_damage_past_the_header(tmp_path):
    raw = tmp_path / "raw.save"
    raw.write_bytes(SAVE)
    final = tmp_path / f"img-aaaaa{memory_file.SUFFIX}"
    memory_file.pack(raw, tmp_path / "partial", final)
    memory_file.verify(final)
    good = final.read_bytes()
    packed = bytearray(good)
    packed[len(packed) // 2] ^= 0xFF
    final.write_bytes(bytes(packed))
    with memory_file.open_stream(final) as stream:
        assert stream.read(16) == b"LibvirtQemudSave", "the start still reads"
    with pytest.raises(InvalidInputError, match="img-aaaaa.memory.zst is damaged: its checksum"):
        memory_file.verify(final)
    final.write_bytes(good[:len(good) // 2])  # no check frame left: read whole, and short
    with pytest.raises(InvalidInputError, match="memory file of image img-aaaaa"):
        memory_file.verify(final)


def test_an_older_file_without_the_check_frame_is_verified_by_reading_it_whole(tmp_path):
    old = tmp_path / f"img-aaaaa{memory_file.SUFFIX}"
    compressor = zstd.ZstdCompressor(level=1)  # as bbsnap wrote them before the check frame
    whole = compressor.compress(SAVE) + compressor.flush()
    old.write_bytes(whole)
    memory_file.verify(old)
    old.write_bytes(whole[:-100])
    with pytest.raises(InvalidInputError, match="memory file of image img-aaaaa"):
        memory_file.verify(old)
