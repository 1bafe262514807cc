"""The tiny guest's write-and-fsync loop, read from the host: what the guest feels.

A guest whose seed's user-data holds the line :data:`USER_DATA_LINE` runs, from boot, a
tight loop of 4 KiB direct writes to its disk, each followed by fsync (``init.sh``,
"write-and-fsync loop"), and logs the guest-clock start and end of every completed write
in :data:`LOG_PATH`. The host opens a window by emptying that log (:func:`open_window`),
does what it measures (a snapshot, a copy), and closes the window by reading the log back
(:func:`read_window`); :func:`window_stats` turns the writes into the figures: the longest
gap between two completed writes, and the median and p99 write latency.

Both calls go through the guest agent (``guest-exec``), so they work on any running tiny
guest with a seed, made by bbsnap or not. The guest's clock is the right one for gaps the
guest suffers while it runs (its vCPU waiting on a write QEMU holds back); a pause of the
whole VM would not show on it (under TCG the guest's clocks stop with it). Opening a window
also reads the guest's clock, so the writes can be placed among host events
(:attr:`OpenWindow.clock_offset`, to within ``clock_error``); :class:`Window` keeps the
host's span of the window beside them.
"""

from __future__ import annotations

import base64
import json
import math
import statistics
import time
from bbsnap.lazy_dataclass import dataclass

from bbsnap.errors import ExternalCommandError
from bbsnap.proc import run, which

USER_DATA_KEY = "bbsnap_writeloop"
USER_DATA_LINE = f"{USER_DATA_KEY}: true"
STARTED_LINE = "BBSNAP-WRITELOOP started"
LOG_PATH = "/run/writeloop.log"
OFF_PATH = "/run/writeloop.off"   # while it exists the loop idles
AGENT_TIMEOUT = 30.0              # seconds a guest-exec may take before we give up


def user_data() -> str:
    """#cloud-config user-data that turns the loop on (and nothing else)."""
    return f"#cloud-config\n{USER_DATA_LINE}\n"


@dataclass(frozen=True)
class Write:
    start: float   # guest clock, seconds
    end: float


@dataclass(frozen=True)
class Window:
    writes: tuple[Write, ...]
    host_span: float   # seconds between open_window's return and read_window's call


@dataclass(frozen=True)
class WindowStats:
    writes: int
    span: float            # first to last completed write, guest clock
    longest_gap: float     # between two consecutive completed writes
    median_latency: float  # one write's start to its end (fork of dd, write, fsync)
    p99_latency: float


def parse_log(text: str) -> tuple[Write, ...]:
    """The writes of a log as the guest wrote it; a torn last line (read mid-append) is
    dropped, anything else malformed is an error."""
    writes = []
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            start, end = (float(value) for value in fields)
        except ValueError:
            if number == len(lines):   # no newline yet: the loop was appending it
                break
            raise ValueError(f"writeloop log line {number} is not '<start> <end>': "
                             f"{line[:80]!r}") from None
        if not (math.isfinite(start) and math.isfinite(end)) or end < start:
            raise ValueError(f"writeloop log line {number} ends before it starts: {line!r}")
        writes.append(Write(start, end))
    return tuple(writes)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported latency is one that happened)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def longest_gap_at(writes: tuple[Write, ...]) -> tuple[float, float]:
    """The two completions (guest clock) the longest gap lies between."""
    ends = sorted(write.end for write in writes)
    if len(ends) < 2:
        raise ValueError(f"a window needs two completed writes, it has {len(ends)}")
    return max(zip(ends, ends[1:], strict=False), key=lambda pair: pair[1] - pair[0])


def window_stats(writes: tuple[Write, ...]) -> WindowStats:
    if len(writes) < 2:
        raise ValueError(f"a window needs two completed writes, it has {len(writes)}")
    ends = sorted(write.end for write in writes)
    gaps = [later - earlier for earlier, later in zip(ends, ends[1:], strict=False)]
    latencies = [write.end - write.start for write in writes]
    return WindowStats(writes=len(writes), span=ends[-1] - ends[0], longest_gap=max(gaps),
                       median_latency=statistics.median(latencies),
                       p99_latency=percentile(latencies, 0.99))


@dataclass
class OpenWindow:
    domain: str
    uri: str
    opened: float        # host monotonic clock
    # The guest's clock less the host's wall clock when the window opened, to place the
    # guest's writes among host events; good to within +- clock_error seconds (half the
    # agent call that read it).
    clock_offset: float
    clock_error: float


def open_window(domain: str, uri: str) -> OpenWindow:
    """Forget the writes so far: the window holds those completed after this returns."""
    before = time.time()
    guest_now = float(guest_shell(domain, uri, f": >{LOG_PATH}; echo $EPOCHREALTIME"))
    after = time.time()
    return OpenWindow(domain, uri, time.monotonic(), guest_now - (before + after) / 2,
                      (after - before) / 2)


def read_window(window: OpenWindow) -> Window:
    host_span = time.monotonic() - window.opened
    return Window(parse_log(guest_shell(window.domain, window.uri, f"cat {LOG_PATH}")),
                  host_span)


def set_running(domain: str, uri: str, running: bool) -> None:
    """Let the loop write, or idle it (for measurements it must not load)."""
    guest_shell(domain, uri, f"rm -f {OFF_PATH}" if running else f": >{OFF_PATH}")


def wait_for_agent(domain: str, uri: str, timeout: float = 60.0) -> None:
    """Until libvirt reaches the guest's agent: the guest prints that it started qemu-ga
    before libvirt has connected to it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _agent(domain, uri, {"execute": "guest-ping"})
            return
        except ExternalCommandError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)  # polling the agent's connection, bounded above


def guest_shell(domain: str, uri: str, command: str) -> str:
    """Run *command* with the guest's /bin/sh through its agent; its stdout."""
    pid = _agent(domain, uri, {"execute": "guest-exec", "arguments": {
        "path": "/bin/sh", "arg": ["-c", command], "capture-output": True}})["pid"]
    deadline = time.monotonic() + AGENT_TIMEOUT
    while True:
        status = _agent(domain, uri, {"execute": "guest-exec-status", "arguments": {"pid": pid}})
        if status.get("exited"):
            break
        if time.monotonic() > deadline:
            raise ExternalCommandError(f"{command!r} did not finish in {domain} within "
                                       f"{AGENT_TIMEOUT:.0f} s")
        time.sleep(0.01)  # polling the agent for the command's exit, bounded above
    if status.get("exitcode") != 0:
        error = base64.b64decode(str(status.get("err-data", ""))).decode(errors="replace")
        raise ExternalCommandError(f"{command!r} failed in {domain}: {error.strip()}")
    return base64.b64decode(str(status.get("out-data", ""))).decode(errors="replace")


def _agent(domain: str, uri: str, command: dict[str, object]) -> dict[str, object]:
    argv = [which("virsh"), "-q", "-c", uri, "qemu-agent-command", domain, json.dumps(command)]
    result = run(argv, timeout=AGENT_TIMEOUT, check=False)
    if result.returncode != 0:
        raise ExternalCommandError(f"guest agent of {domain}: {result.stderr.strip()}",
                                   argv=argv, returncode=result.returncode,
                                   stderr=result.stderr)
    answer = json.loads(result.stdout).get("return", {})
    if not isinstance(answer, dict):
        raise ExternalCommandError(f"guest agent of {domain} answered {result.stdout[:200]!r}")
    return answer
