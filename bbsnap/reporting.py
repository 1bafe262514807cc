"""How services tell the user what happens, without printing: one reporter interface.

Services take a :class:`Reporter` and call it; the CLI passes its terminal implementation
(``cli/reporter.py``, the only place that writes these lines), tests a recording one, and
everything else gets :data:`SILENT`. Texts are plain: the implementation escapes and
prefixes them ("bbsnap: note: ...").
"""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def note(self, text: str) -> None:
        """Something bbsnap decided that the user did not ask for."""

    def warning(self, text: str) -> None:
        """Something went less well than asked, and the operation went on."""

    def waiting(self, what: str) -> None:
        """The operation waits for *what* ("another operation on srv-x") to finish."""

    def progress(self, label: str, done: int, total: int | None = None,
                 percent: int | None = None) -> None:
        """*done* bytes of *total* (when known); *percent* when only that is known."""

    def progress_end(self) -> None:
        """The progress shown since the last call is over."""


class SilentReporter:
    def note(self, text: str) -> None:
        pass

    def warning(self, text: str) -> None:
        pass

    def waiting(self, what: str) -> None:
        pass

    def progress(self, label: str, done: int, total: int | None = None,
                 percent: int | None = None) -> None:
        pass

    def progress_end(self) -> None:
        pass


SILENT: Reporter = SilentReporter()
