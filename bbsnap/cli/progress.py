"""Progress on stderr, only when stderr is a terminal (pipes and logs stay clean)."""

from __future__ import annotations

import sys
import time
from typing import Callable

from ..sizes import MIB
from ..text import escape


def byte_progress(label: str,
                  total: int | None) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A (report, finish) pair; report(bytes_done) redraws at most 10 times a second."""
    if not sys.stderr.isatty():
        return (lambda _done: None), (lambda: None)
    last = [0.0]
    label = escape(label)  # a file name in it must not break the line it redraws

    def report(done: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.1:
            return
        last[0] = now
        if total:
            width = 30
            filled = min(width, int(width * done / total))
            bar = "#" * filled + "." * (width - filled)
            text = f"\r{label} [{bar}] {done // MIB}/{total // MIB} MiB"
        else:
            text = f"\r{label} {done // MIB} MiB"
        sys.stderr.write(text)
        sys.stderr.flush()

    def finish() -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()

    return report, finish
