"""The snapshot worker's command line: built and parsed in bbsnap/services/snapshots/worker.py, and a worker
that was not handed the server's lock refuses to copy (it would race a prune or revert)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest

from bbsnap.services.snapshots import worker


def test_the_command_line_the_service_builds_is_the_one_the_worker_parses(tmp_path, capsys):
    base = worker.base_argv(str(tmp_path / "data"), "test:///default")
    argv = worker.finish_snapshot_argv(base, "img-aaaaa", 987)
    assert argv[:3] == [sys.executable, "-m", "bbsnap.services.snapshots.worker"]
    # fd 987 is not open: the worker stops before opening anything.
    assert worker.main(argv[3:]) == 2
    assert "not started with the server's lock (fd 987)" in capsys.readouterr().out
    assert not (tmp_path / "data").exists()


def test_a_lock_held_through_another_open_file_is_not_ours(tmp_path):
    path = tmp_path / "server.lock"
    path.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(path)!r})\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        fd = os.open(path, os.O_RDONLY)
        try:
            assert not worker._holds_lock(fd)  # another process holds it
        finally:
            os.close(fd)
    finally:
        holder.communicate("")
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert worker._holds_lock(fd)  # what a worker inherits: the same open file
    finally:
        os.close(fd)


def test_a_worker_started_early_waits_for_go_and_does_nothing_without_it(tmp_path, capsys):
    """`servers snapshot` starts its worker before the backup begins (--go-fd); a command
    that fails or dies closes the pipe without "go", and the worker leaves everything as it
    was (the command cleans up, or crash recovery adopts the job)."""
    lock_path = tmp_path / "server.lock"
    lock_path.write_text("")
    lock_fd = os.open(lock_path, os.O_RDONLY)
    read_end, write_end = os.pipe()
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        os.close(write_end)  # the command is gone, nothing written
        base = worker.base_argv(str(tmp_path / "data"), "test:///default")
        argv = worker.finish_snapshot_argv(base, "img-aaaaa", lock_fd, read_end)
        assert argv[-2:] == ["--go-fd", str(read_end)]
        assert worker.main(argv[3:]) == 0
        assert "the command stopped before the copy began; nothing done" in capsys.readouterr().out
    finally:
        os.close(lock_fd)
    with pytest.raises(OSError):
        os.fstat(read_end)  # the worker read the pipe to its end and closed it


def test_go_is_what_the_command_writes_and_anything_short_of_it_is_not(tmp_path):
    for sent, expected in ((worker.GO, True), (b"g", False), (b"", False), (b"no", False)):
        read_end, write_end = os.pipe()
        os.write(write_end, sent)
        os.close(write_end)
        assert worker._wait_for_go(read_end) is expected, sent
