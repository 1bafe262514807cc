"""The write loop's log, read on the host, and the switch the guest's /init turns it on by."""

from __future__ import annotations

import re
import subprocess

import pytest

from bbsnap.seed import default_user_data, validate_user_data
from bbsnap.tinyguest import writeloop
from bbsnap.tinyguest.build import init_script
from bbsnap.tinyguest.writeloop import Write, parse_log, percentile, window_stats


def test_parse_log_reads_each_completed_write():
    text = "1000.000100 1000.010100\n1000.010200 1000.021000\n"
    assert parse_log(text) == (Write(1000.0001, 1000.0101), Write(1000.0102, 1000.021))


def test_parse_log_drops_a_line_the_loop_was_still_appending():
    assert parse_log("1.0 1.5\n2.0 2.") == (Write(1.0, 1.5), Write(2.0, 2.0))
    assert parse_log("1.0 1.5\n2.0") == (Write(1.0, 1.5),)


def test_parse_log_refuses_garbage_inside_the_log():
    with pytest.raises(ValueError, match="line 2"):
        parse_log("1.0 1.5\nhello\n3.0 3.5\n")
    with pytest.raises(ValueError, match="ends before it starts"):
        parse_log("2.0 1.0\n")


def test_window_stats_longest_gap_is_between_completions():
    # Completions at 1.0, 1.1, 1.6, 1.7: the longest gap is 0.5 s, whatever the starts.
    writes = (Write(0.99, 1.0), Write(1.09, 1.1), Write(1.2, 1.6), Write(1.69, 1.7))
    stats = window_stats(writes)
    assert stats.writes == 4
    assert stats.longest_gap == pytest.approx(0.5)
    assert stats.span == pytest.approx(0.7)
    assert stats.median_latency == pytest.approx(0.01)
    assert stats.p99_latency == pytest.approx(0.4)


def test_longest_gap_at_names_its_two_completions():
    writes = (Write(0.99, 1.0), Write(1.09, 1.1), Write(1.2, 1.6), Write(1.69, 1.7))
    assert writeloop.longest_gap_at(writes) == (1.1, 1.6)


def test_window_stats_needs_two_writes():
    with pytest.raises(ValueError, match="two completed writes"):
        window_stats((Write(1.0, 1.1),))


def test_percentile_is_a_value_that_happened():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 0.5) == 50.0
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


def _wanted(user_data: str | None, tmp_path) -> bool:
    """Run /init's own writeloop_wanted() on *user_data* in a POSIX shell."""
    source = init_script().decode()
    function = re.search(r"^writeloop_wanted\(\) \{\n.*?^\}\n", source, re.S | re.M)
    assert function is not None
    path = tmp_path / "user-data"
    path.unlink(missing_ok=True)
    if user_data is not None:
        path.write_text(user_data)
    script = f'USER_DATA="{path}"\n{function.group(0)}writeloop_wanted\n'
    return subprocess.run(["sh", "-c", script]).returncode == 0


def test_the_guest_runs_the_loop_only_when_the_user_data_asks(tmp_path):
    text = writeloop.user_data()
    assert validate_user_data(text) == text   # bbsnap accepts it as --user-data
    assert _wanted(text, tmp_path)
    assert not _wanted(None, tmp_path)
    assert not _wanted(default_user_data("tiny", ["ssh-ed25519 AAAA k"], None), tmp_path)
    assert not _wanted("#cloud-config\nbbsnap_writeloop: false\n", tmp_path)
    assert not _wanted("#cloud-config\n# bbsnap_writeloop: true\n", tmp_path)
