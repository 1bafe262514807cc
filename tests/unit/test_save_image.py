"""libvirt's save-image header read from a stream (hypervisor/save_image.py)."""

from __future__ import annotations

import io
import struct

import pytest

from bbsnap.hypervisor import save_image

XML = b"<domain type='qemu'><name>srv-aaaaa</name></domain>"


def header(magic: bytes = save_image.MAGIC, order: str = "<", version: int = 2,
           xml: bytes = XML, cookie: bytes = b"<qemu-migration/>", pad: int = 1024) -> bytes:
    data = xml + b"\0" + cookie + b"\0" + b"\0" * pad
    return (magic + struct.pack(f"{order}5I", version, len(data), 1, 0, len(xml) + 1)
            + bytes(14 * 4) + data)


def test_the_header_definition_and_cookie_are_read_and_the_stream_left_after_them():
    raw = header()
    stream = io.BytesIO(raw + b"QEVM\0\0\0\3rest")
    head = save_image.read_head(stream)
    assert head.definition == XML.decode()
    assert head.was_running
    assert head.data == raw, "the bytes a restore from a FIFO must be fed first"
    assert stream.read(4) == b"QEVM", "QEMU's stream follows"
    assert save_image.HEADER_SIZE == 92  # src/qemu/qemu_saveimage.h


def test_a_header_of_the_other_byte_order_is_read():
    assert save_image.read_head(io.BytesIO(header(order=">"))).definition == XML.decode()


@pytest.mark.parametrize("raw, message", [
    (header(magic=save_image.PARTIAL), "not finished"),
    (b"not a save image at all" * 10, "not a libvirt save image"),
    (header()[:200], "ends after"),
    (header(version=7), "unknown save-image version"),
    (header(xml=b"\xff\xfe"), "not text"),
    (header(xml=b"<network/>"), "not a domain"),
    (header(xml=b"<domain"), "not XML"),
])
def test_what_is_not_a_whole_save_header_is_refused(raw, message):
    with pytest.raises(save_image.NotASaveImage, match=message):
        save_image.read_head(io.BytesIO(raw))
