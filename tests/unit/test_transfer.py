"""Early writeback: best effort, never an error, never a change to the file."""

from __future__ import annotations

import sys

import pytest

from bbsnap.transfer import _sync_file_range, start_writeback


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_sync_file_range_is_found_in_libc_on_linux():
    assert _sync_file_range() is not None


def test_start_writeback_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "copy.qcow2"
    data = bytes(range(256)) * 4096
    path.write_bytes(data)
    start_writeback(path)
    assert path.read_bytes() == data


def test_start_writeback_of_a_file_not_created_yet_does_nothing(tmp_path):
    start_writeback(tmp_path / "not-yet.qcow2")
    assert not (tmp_path / "not-yet.qcow2").exists()
