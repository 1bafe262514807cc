"""The snapshot worker's command line: built and parsed in bbsnap/services/snapshots/worker.py, and a worker
that was not handed the server's lock refuses to copy (it would race a prune or revert)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

from bbsnap.services.snapshots import worker


def test_the_command_line_the_service_builds_is_the_one_the_worker_parses(tmp_path, capsys):
    base = worker.base_argv(str(tmp_path / "data"), "test:///default")
    argv = worker.finish_snapshot_argv(base, "img-aaaaa", 987)
    assert argv[:3] == [sys.executable, "-m", "bbsnap.services.snapshots.worker"]
    # fd 987 is not open: the worker stops before opening anything.
    assert worker.main(argv[3:]) == 2
    assert "not started with the server's lock (fd 987)" in capsys.readouterr().out
    assert not (tmp_path / "data").exists()
    silent = worker.finish_snapshot_argv(base, "img-aaaaa", 987, agent_silent=True)
    assert silent == [*argv, "--agent-silent"]
    assert worker.main(silent[3:]) == 2  # parsed: the lock check is what stops it
    assert "not started with the server's lock (fd 987)" in capsys.readouterr().out


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
