"""What the guest feels during a live snapshot, measured inside a real guest (TCG).

The tiny guest's write-and-fsync loop (bbsnap/tinyguest/writeloop.py) runs while bbsnap
snapshots it; the longest gap between two completed writes must stay far below anything a
pause of the guest for the copy would cost. The bound is generous (the figures and their
goals are scripts/bench_guest_view.py's): the check is that the guest keeps writing through
the instant and the copy, not how fast this shared machine is.
"""

from __future__ import annotations

import time

from bbsnap.tinyguest import READY_LINE, writeloop
from tests.system.conftest import (URI, console_path, create_server, wait_for_console_line,
                                   wait_settled)

LONGEST_GAP_BOUND = 2.0   # seconds; the loop's usual gap here is 30-60 ms


def test_the_guest_keeps_writing_through_snapshots(cloud, work_dir):
    user_data = work_dir / "user-data"
    user_data.write_text(writeloop.user_data())
    (server,) = create_server(cloud, "--user-data", str(user_data))
    console = console_path(cloud, server["id"])
    wait_for_console_line(console, READY_LINE)
    wait_for_console_line(console, writeloop.STARTED_LINE, timeout=1)
    writeloop.wait_for_agent(server["id"], URI)

    for flags in (("--no-quiesce",), ()):   # crash-consistent, then quiesced
        window = writeloop.open_window(server["id"], URI)
        result = cloud("servers", "snapshot", server["id"], *flags)
        returned = time.time()
        assert result.exit_code == 0, result.stderr
        record = wait_settled(cloud, result.stdout.strip())
        available = time.time()
        assert record["state"] == "available", record["failure_reason"]
        writes = writeloop.read_window(window).writes
        assert len(writes) >= 10, console.read_text(errors="replace")[-2000:]
        stats = writeloop.window_stats(writes)
        # On the host's clock (placed through the agent, to within clock_error): writes
        # completed before the instant was fixed and went on until the image was available
        # (the last within the bound of it), no two further apart than the bound.
        ends = sorted(write.end - window.clock_offset for write in writes)
        assert ends[0] <= returned + window.clock_error, (flags, stats)
        assert ends[-1] >= available - window.clock_error - LONGEST_GAP_BOUND, (flags, stats)
        assert stats.longest_gap < LONGEST_GAP_BOUND, (flags, stats)
