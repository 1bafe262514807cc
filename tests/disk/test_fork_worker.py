"""The forked snapshot worker's process mechanics (proc.fork_detached, worker.ForkedWorker)
and the catalogue connection put aside across the fork; the hypervisor path itself is
proved by tests/system/test_full_copy.py and the snapshot fault tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bbsnap import proc
from bbsnap.models import Image, ImageStatus, ImageType
from bbsnap.state import locks
from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.state.process_tokens import job_alive, token_for_pid
from bbsnap.services.snapshots import worker


def _read_line(fd: int) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.decode()


def test_the_worker_is_detached_and_its_output_goes_to_the_log_only(tmp_path):
    """A caller whose output is a pipe (`$(bbsnap servers snapshot ...)`) sees EOF when it
    exits, though the worker lives on; the caller's unflushed output is not in the log."""
    log = tmp_path / "worker.log"
    go_r, go_w = os.pipe()
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from bbsnap import proc
        sys.stdout.write("caller's unflushed text")
        def work():
            print("worker", os.getpid(), os.getsid(0), flush=True)
            os.read({go_r}, 1)  # until the test says so
            print("worker done", flush=True)
            return 0
        pid = proc.fork_detached(work, log_path=Path({str(log)!r}), keep_fds=[{go_r}])
        sys.stderr.write(f"{{pid}} {{os.getsid(0)}}\\n")
    """)
    caller = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            pass_fds=[go_r], timeout=60, env={**os.environ})
    os.close(go_r)
    try:
        assert caller.returncode == 0, caller.stderr
        pid, caller_session = (int(n) for n in caller.stderr.split())
        assert caller.stdout == "caller's unflushed text"  # once, in the caller's output
        token = token_for_pid(pid)
        assert job_alive(token), "the worker outlived its caller"
        first = log.read_text()
        _, worker_pid, session = first.splitlines()[0].split()
        assert int(worker_pid) == pid
        assert int(session) not in (caller_session, os.getsid(0)), "a session of its own"
        assert "unflushed" not in first
        assert log.stat().st_mode & 0o777 == 0o600
    finally:
        os.write(go_w, b"x")
        os.close(go_w)
    # The worker's own end of the pipe was kept: it read the byte and went on.
    deadline = time.monotonic() + 60
    while job_alive(token) and time.monotonic() < deadline:
        os.sched_yield()  # not our child: nothing to wait on but its /proc entry
    assert log.read_text().endswith("worker done\n")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_a_finished_worker_not_yet_reaped_is_dead_and_the_next_fork_reaps_it(tmp_path):
    """A long-lived caller (the scheduler, an in-process benchmark) is the worker's parent:
    until it reaps it, the worker is a zombie, whose /proc entry must not pass for a live
    job (recovery would never adopt its image)."""
    pid = proc.fork_detached(lambda: 0, log_path=tmp_path / "first.log")
    token = f"{pid}:{Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19]}:" \
            f"{token_for_pid(os.getpid()).rsplit(':', 1)[1]}"
    deadline = time.monotonic() + 60
    while _state(pid) != "Z" and time.monotonic() < deadline:
        os.sched_yield()
    assert _state(pid) == "Z"
    assert not job_alive(token)
    assert token_for_pid(pid) is None
    again = proc.fork_detached(lambda: 0, log_path=tmp_path / "second.log")
    assert _state(pid) == "gone", "reaped by the next fork"
    os.waitpid(again, 0)


def test_a_forked_worker_holds_the_lock_and_waits_for_its_caller_to_be_done(tmp_path,
                                                                           monkeypatch):
    # This process may run other tests' daemon threads (servers): as the command it stands
    # for, it has one thread here, so the launcher forks.
    monkeypatch.setattr(worker.threading, "active_count", lambda: 1)
    lock = locks.acquire(tmp_path / "locks", "0000-uuid")
    fifo = tmp_path / "said"
    os.mkfifo(fifo)  # opened by path in the worker: it keeps none of its caller's pipes
    launcher = worker.ForkedWorker(str(tmp_path / "data"), "test:///default")

    def fake_finish(image_id, lock_fd, *, data_dir, connect, timeline, handed_over,
                    agent_silent):
        said = os.open(fifo, os.O_WRONLY)
        os.write(said, f"started {image_id} {worker._holds_lock(lock_fd)} "
                       f"agent silent: {agent_silent}\n".encode())
        handed_over()
        os.write(said, b"released\n")
        return 0

    real = worker.finish_snapshot
    worker.finish_snapshot = fake_finish  # the fork copies this process, stand-in included
    try:
        pid = launcher.start("img-aaaaa", lock, tmp_path / "img-aaaaa.log", agent_silent=True)
    finally:
        worker.finish_snapshot = real
    lock.release()  # the caller's copy: the worker's keeps the server locked
    said = os.open(fifo, os.O_RDONLY)
    try:
        assert _read_line(said) == "started img-aaaaa True agent silent: True\n"
        assert locks.try_acquire(tmp_path / "locks", "0000-uuid") is None
        assert job_alive(token_for_pid(pid))
        launcher.release()
        assert _read_line(said) == "released\n"
    finally:
        launcher.release()
        os.close(said)


def test_a_catalogue_put_aside_reopens_on_next_use_and_still_vouches_for_its_rows(tmp_path):
    path = tmp_path / "catalogue.sqlite3"
    catalogue = Catalogue(path)
    image = Image(id="img-aaaaa", type=ImageType.SNAPSHOT, owner="local",
                  created_at=utcnow(), status=ImageStatus.CREATING, name="x")
    catalogue.add(image)
    catalogue.put_aside()  # the last connection: SQLite checkpoints and removes the WAL
    other = Catalogue(path)  # what the worker opens meanwhile
    other.update("img-aaaaa", progress=50)
    other.close()
    assert catalogue.update("img-aaaaa", status=ImageStatus.AVAILABLE).progress == 50
    assert not catalogue.files_replaced(), "its own close is not a replacement"
    assert catalogue.touched == ["img-aaaaa"]
    assert catalogue.checkpoint()
    assert catalogue.missing_from_main_file() == []
    catalogue.close()


def test_a_replaced_main_file_is_still_seen_after_a_put_aside(tmp_path):
    path = tmp_path / "catalogue.sqlite3"
    catalogue = Catalogue(path)
    catalogue.put_aside()
    moved = Path(str(path) + ".old")
    path.rename(moved)
    Catalogue(path).close()  # someone else's new file at the path
    catalogue.exists("img-aaaaa")
    assert catalogue.files_replaced()
    catalogue.close()


def test_a_process_with_other_threads_gets_a_new_interpreter_instead_of_a_fork(tmp_path,
                                                                             monkeypatch):
    """A fork would inherit the locks other threads hold (a worker forked from a test
    runner hung in virConnectOpen on one): with another thread alive, the worker is a new
    interpreter (the command line crash recovery uses), holding the same lock."""
    lock = locks.acquire(tmp_path / "locks", "0000-uuid")
    held = lock.fd
    started: list[tuple[list[str], list[int]]] = []
    monkeypatch.setattr(proc, "spawn_detached", lambda argv, *, log_path, pass_fds:
                        started.append((argv, pass_fds)) or 4242)
    monkeypatch.setattr(proc, "fork_detached", lambda *a, **k: pytest.fail("forked"))
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        launcher = worker.ForkedWorker(str(tmp_path / "data"), "test:///default")
        assert launcher.start("img-aaaaa", lock, tmp_path / "img-aaaaa.log") == 4242
        launcher.release()
    finally:
        stop.set()
        other.join()
        lock.release()
    ((argv, fds),) = started
    assert argv == worker.finish_snapshot_argv(
        worker.base_argv(str(tmp_path / "data"), "test:///default"), "img-aaaaa", held)
    assert fds == [held]
