"""The worker's timeline (what the benchmark breaks a snapshot's time down by) and its
polling pace (how soon it sees QEMU's job end)."""

from __future__ import annotations

import time

from bbsnap.services.snapshots import finish, timeline


def test_the_line_the_worker_logs_is_the_timeline_the_benchmark_reads():
    made = timeline.Timeline()
    made.mark("ready", 1000.25)
    made.mark("copied", 1001.5)
    made.duration("job", 0.75)
    log = f"2026-12-01T15:00:00+00:00 finishing snapshot img-aaaaa\n{made.line()}\nother line\n"
    read = timeline.parse(log)
    assert read is not None
    assert read.marks == [("ready", 1000.25), ("copied", 1001.5)]
    assert read.durations == {"job": 0.75}
    assert timeline.parse("no timeline here\n") is None


def test_this_process_started_before_now_and_not_long_ago():
    started = timeline.process_start()
    assert started is not None
    assert started <= time.time()
    assert time.time() - started < 24 * 3600


def test_polls_speed_up_only_as_the_copy_nears_its_end(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(finish.time, "monotonic", lambda: now[0])
    pace = finish._PollPace()
    gib = 1 << 30
    assert pace.next(0, gib) == finish.MIN_POLL_SECONDS * 2  # no rate yet
    now[0] += 0.1
    assert pace.next(gib // 10, gib) == finish.POLL_SECONDS  # ~0.9 s to go
    now[0] += 0.8
    # 95 % copied after 0.9 s: ~47 ms to go, so the next poll comes after ~24 ms
    assert abs(pace.next(gib * 95 // 100, gib) - 0.0237) < 0.001
    now[0] += 0.05
    assert pace.next(gib, gib) == finish.MIN_POLL_SECONDS  # copied, QEMU flushes: any moment


def test_a_copy_that_stands_still_is_polled_at_the_slow_pace(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(finish.time, "monotonic", lambda: now[0])
    pace = finish._PollPace()
    pace.next(4096, 1 << 30)
    now[0] += 1.0  # throttled: nothing more copied (the fault tests slow the job to 1 B/s)
    assert pace.next(4096, 1 << 30) == finish.POLL_SECONDS


def test_the_commands_line_sits_beside_the_workers_in_the_same_log(tmp_path):
    log = tmp_path / "img-aaaaa.log"
    worker = timeline.Timeline()
    worker.mark("ready", 1000.5)
    log.write_text(worker.line() + "\n")
    command = timeline.Timeline()
    command.mark("parsed", 999.0)
    command.mark("recorded", 999.25)
    command.append_to(log, timeline.COMMAND_PREFIX)
    text = log.read_text()
    assert timeline.parse(text) is not None and timeline.parse(text).marks == [("ready", 1000.5)]
    read = timeline.parse(text, timeline.COMMAND_PREFIX)
    assert read is not None and read.marks == [("parsed", 999.0), ("recorded", 999.25)]
    command.append_to(tmp_path / "no-such-dir" / "x.log", timeline.COMMAND_PREFIX)  # no error
