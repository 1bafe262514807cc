"""Undo what a multi-step operation did when a later step fails.

Each step that creates something registers how to remove it; on an exception
the removals run newest first, and a failing removal never hides the error
that caused the rollback.
"""

from __future__ import annotations

from types import TracebackType
from typing import Callable

from bbsnap.reporting import SILENT, Reporter


class Compensation:
    def __init__(self, reporter: Reporter = SILENT) -> None:
        self._undo: list[tuple[str, Callable[[], object]]] = []
        self._reporter = reporter

    def push(self, what: str, undo: Callable[[], object]) -> None:
        self._undo.append((what, undo))

    def __enter__(self) -> "Compensation":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            return
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as cleanup_error:
                self._reporter.warning(f"could not undo {what}: {cleanup_error}")
