"""The CLI's reporter: notes, warnings and waits as one escaped line each on stderr, and
progress redrawn in place only when stderr is a terminal (pipes and logs stay clean)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from bbsnap.sizes import MIB
from bbsnap.text import escape

BAR_WIDTH = 30
REDRAW_INTERVAL = 0.1  # seconds: at most ten redraws a second


class TerminalReporter:
    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty() if tty is None else tty
        self._drawn = False
        self._last_draw = 0.0

    def _line(self, text: str) -> None:
        self.progress_end()  # a line never lands in the middle of a progress bar
        self._stream.write(escape(text) + "\n")
        self._stream.flush()

    def note(self, text: str) -> None:
        self._line(f"bbsnap: note: {text}")

    def warning(self, text: str) -> None:
        self._line(f"bbsnap: warning: {text}")

    def waiting(self, what: str) -> None:
        self._line(f"bbsnap: waiting for {what} to finish")

    def step(self, text: str) -> None:
        self._line(f"  {text}")  # indented under the command's own line

    def progress(self, label: str, done: int, total: int | None = None,
                 percent: int | None = None) -> None:
        if not self._tty:
            return
        now = time.monotonic()
        if self._drawn and now - self._last_draw < REDRAW_INTERVAL:
            return
        self._last_draw = now
        if percent is None and total:
            percent = min(100, done * 100 // total)
        text = escape(label)  # a file name in it must not break the line it redraws
        if percent is not None:
            filled = min(BAR_WIDTH, BAR_WIDTH * percent // 100)
            text += f" [{'#' * filled}{'.' * (BAR_WIDTH - filled)}]"
        text += f" {done // MIB}/{total // MIB} MiB" if total else f" {done // MIB} MiB so far"
        self._stream.write("\r" + text)
        self._stream.flush()
        self._drawn = True

    def progress_end(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False
