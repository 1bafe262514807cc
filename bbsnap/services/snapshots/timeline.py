"""When each step of a snapshot happened, for the benchmark's breakdown of "until available".

The worker marks its steps (started, connected, the copy's end, each disk checked and
stored, available) and writes the marks as one line into its log; so does the command
(:data:`COMMAND`: parsed, the catalogue opened, locked, frozen, the backup begun, thawed,
the worker forked, recorded), as a line of its own in the same log (:data:`COMMAND_PREFIX`).
``scripts/bench_snapshot.py`` reads those lines back and prints the time between the marks. Wall-clock
times (``time.time``), not monotonic ones: the marks of two processes (the command and its
worker) are compared with each other. Durations measured by someone else (QEMU's job, as
libvirt timed it) go beside the marks.
"""

from __future__ import annotations

import os
import time
from dataclasses import field

from bbsnap.lazy_dataclass import dataclass

PREFIX = "timeline:"
COMMAND_PREFIX = "command-timeline:"


@dataclass
class Timeline:
    marks: list[tuple[str, float]] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)

    def mark(self, label: str, at: float | None = None) -> None:
        self.marks.append((label, time.time() if at is None else at))

    def duration(self, label: str, seconds: float) -> None:
        self.durations[label] = seconds

    def clear(self) -> None:
        self.marks.clear()
        self.durations.clear()

    def line(self, prefix: str = PREFIX) -> str:
        """``timeline: label=epoch ... ~label=seconds ...`` (labels hold no spaces, '=' or '~')."""
        return " ".join([prefix, *(f"{label}={at:.6f}" for label, at in self.marks),
                         *(f"~{label}={seconds:.6f}" for label, seconds in self.durations.items())])

    def append_to(self, log: str | os.PathLike[str], prefix: str) -> None:
        """Add the line to *log* (the image's log, which the worker writes too: one
        O_APPEND write of a whole line, so the two never interleave within a line)."""
        try:
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, (self.line(prefix) + "\n").encode())
            finally:
                os.close(fd)
        except OSError:
            pass  # a figure for the benchmark: never a reason for the snapshot to fail


# The command's own marks (a process-wide timeline: cli/servers.py marks the steps before
# the snapshot service exists, the service those after, and writes them into the log).
COMMAND = Timeline()


def parse(text: str, prefix: str = PREFIX) -> Timeline | None:
    """The last timeline line in *text* (a worker's log); None if there is none."""
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    if not lines:
        return None
    found = Timeline()
    for item in lines[-1][len(prefix):].split():
        label, _, value = item.partition("=")
        if label.startswith("~"):
            found.duration(label[1:], float(value))
        else:
            found.mark(label, float(value))
    return found


def process_start() -> float | None:
    """When this process was started (to the kernel's clock tick, 10 ms), as a wall-clock
    time: the interpreter's start-up and imports come before any mark the code can make."""
    try:
        with open("/proc/self/stat") as handle:
            # The command name (field 2) may hold spaces: count the fields after its ')'.
            started_ticks = int(handle.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None
    since_boot = time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - since_boot
