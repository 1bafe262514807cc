"""The memory file's read-ahead (services/read_ahead.py): the stream after the skipped head
fed into a real pipe after the restore's own first bytes, through splice and through the
copying path, across the ring's end; what reading raised handed on after the bytes before
it; a cancel that ends a thread waiting for room in the ring."""

from __future__ import annotations

import errno
import io
import os
import threading

import pytest

from bbsnap.errors import InvalidInputError
from bbsnap.services import memory_file, read_ahead


def fed(ahead: read_ahead.ReadAhead, first: bytes) -> tuple[bytes, BaseException | None]:
    """What ``feed`` wrote into a pipe (read by a thread here), and what it raised."""
    read_end, write_end = os.pipe()
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(read_end, 1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    error = None
    try:
        ahead.feed(first, write_end)
    except BaseException as exc:  # returned for the test to look at
        error = exc
    reader.join()
    os.close(read_end)
    return bytes(received), error


def fed_through(monkeypatch, splice, data: bytes, skip: int,  # type: ignore[no-untyped-def]
                first: bytes) -> tuple[bytes, BaseException | None, list[object]]:
    """``fed`` of a read-ahead of *data* past *skip*, with os.splice replaced by *splice*
    (called with the real one's arguments and the real one); also the calls it got."""
    calls: list[object] = []
    real = os.splice

    def standing_in(*args: object, **kwargs: object) -> int:
        calls.append(args)
        return int(splice(real, *args, **kwargs))

    monkeypatch.setattr(read_ahead.os, "splice", standing_in)
    ahead = read_ahead.ReadAhead(io.BytesIO(data), skip)
    received, error = fed(ahead, first)
    ahead.cancel()
    return received, error, calls


def _refused(errnum: int):  # type: ignore[no-untyped-def]
    def splice(_real, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errnum, os.strerror(errnum))
    return splice


def test_the_first_bytes_then_the_stream_after_the_skipped_head_spliced(monkeypatch):
    data = os.urandom(3 * memory_file.CHUNK + 123)
    received, error, spliced = fed_through(
        monkeypatch, lambda real, *args, **kwargs: real(*args, **kwargs), data, 100, b"HEAD")
    assert error is None
    assert received == b"HEAD" + data[100:]
    assert spliced, "the pipe was fed by splice"


def test_the_ring_wraps_many_times_without_losing_a_byte(monkeypatch):
    monkeypatch.setattr(read_ahead, "LIMIT", 0)  # the smallest ring: one chunk and the reserve
    data = os.urandom(7 * (memory_file.CHUNK + read_ahead.RESERVE) + 4099)
    ahead = read_ahead.ReadAhead(io.BytesIO(data), 0)
    received, error = fed(ahead, b"")
    ahead.cancel()
    assert error is None
    assert received == data


def test_a_pipe_larger_than_the_reserve_is_fed_by_copying(monkeypatch):
    monkeypatch.setattr(read_ahead, "RESERVE", 4096)  # below a pipe's 64 KiB: no splice
    data = os.urandom(2 * memory_file.CHUNK + 5)
    received, error, spliced = fed_through(monkeypatch, _refused(errno.EFAULT), data, 0, b"x")
    assert error is None
    assert received == b"x" + data
    assert spliced == [], "spliced into a pipe larger than the reserve"


@pytest.mark.parametrize("refusal", [errno.EINVAL, errno.ENOSYS])
def test_a_kernel_that_refuses_splice_is_fed_by_copying(monkeypatch, refusal):
    """The first refused splice switches the feeder to pread+write for the rest: every
    byte arrives once, in order, and splice is not tried again."""
    data = os.urandom(3 * memory_file.CHUNK + 77)
    received, error, tried = fed_through(monkeypatch, _refused(refusal), data, 10, b"HEAD")
    assert error is None
    assert received == b"HEAD" + data[10:]
    assert len(tried) == 1


def test_another_splice_error_is_raised_to_the_caller(monkeypatch):
    received, error, _ = fed_through(monkeypatch, _refused(errno.EIO),
                                     os.urandom(memory_file.CHUNK), 0, b"")
    assert isinstance(error, OSError) and error.errno == errno.EIO
    assert received == b""


def test_a_read_error_is_raised_to_the_feeder_after_the_bytes_before_it():
    class BreaksLate(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            if self.tell() >= memory_file.CHUNK:
                raise EOFError("Compressed file ended before the end-of-stream marker")
            return super().read(size)

    data = os.urandom(3 * memory_file.CHUNK)
    ahead = read_ahead.ReadAhead(BreaksLate(data), 0)
    received, error = fed(ahead, b"")
    ahead.cancel()
    assert isinstance(error, InvalidInputError) and "ended before" in str(error)
    assert received == data[:memory_file.CHUNK]


def test_a_reader_gone_is_a_broken_pipe():
    ahead = read_ahead.ReadAhead(io.BytesIO(os.urandom(2 * memory_file.CHUNK)), 0)
    read_end, write_end = os.pipe()
    os.close(read_end)
    with pytest.raises(BrokenPipeError):
        ahead.feed(b"head", write_end)
    ahead.cancel()


def test_cancel_ends_a_thread_waiting_for_room_in_the_ring(monkeypatch):
    monkeypatch.setattr(read_ahead, "LIMIT", 0)  # one chunk held at most
    source = io.BytesIO(os.urandom(8 * memory_file.CHUNK))
    ahead = read_ahead.ReadAhead(source, 0)
    ahead.cancel()
    assert source.closed, "the thread ended and closed its source"
    ahead.cancel()  # a second cancel does nothing
