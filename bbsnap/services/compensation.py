"""Undo what a multi-step operation did when a later step fails.

Each step that creates something registers how to remove it; on an exception
the removals run newest first, and a failing removal never hides the error
that caused the rollback.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Callable

from ..text import escape


class Compensation:
    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], object]]] = []

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
                print(f"bbsnap: warning: could not undo {escape(what)}: {escape(cleanup_error)}",
                      file=sys.stderr)
