"""The memory file's read-ahead (services/read_ahead.py): the chunks in order, what reading
raised handed on, and a cancel that ends a thread waiting on a full queue."""

from __future__ import annotations

import io
import os

import pytest

from bbsnap.errors import InvalidInputError
from bbsnap.services import memory_file, read_ahead


def test_the_chunks_after_the_skipped_head_come_in_order():
    data = os.urandom(3 * memory_file.CHUNK + 123)
    ahead = read_ahead.ReadAhead(io.BytesIO(data), 100)
    assert b"".join(ahead.chunks()) == data[100:]
    ahead.cancel()


def test_a_read_error_is_raised_to_the_reader():
    class Broken(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise EOFError("Compressed file ended before the end-of-stream marker")

    ahead = read_ahead.ReadAhead(Broken(), 0)
    with pytest.raises(InvalidInputError, match="ended before"):
        list(ahead.chunks())
    ahead.cancel()


def test_cancel_ends_a_thread_waiting_on_a_full_queue(monkeypatch):
    monkeypatch.setattr(read_ahead, "LIMIT", memory_file.CHUNK)  # one chunk held at most
    source = io.BytesIO(os.urandom(8 * memory_file.CHUNK))
    ahead = read_ahead.ReadAhead(source, 0)
    chunks = ahead.chunks()
    assert len(next(chunks)) == memory_file.CHUNK
    ahead.cancel()
    assert source.closed, "the thread ended and closed its source"
