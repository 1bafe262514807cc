"""A call run in a thread of its own, its outcome handed to the thread that waits for it.

For the few places one command does two things at once: libvirt saving a guest's memory
while bbsnap watches its disks (services/snapshots/memory.py), a memory file checked or fed
into a FIFO while libvirt restores it (services/memory_restore.py). libvirt-python lets go
of the GIL while it waits, and so do file reads and zstd.

Waiting always means the thread has *ended* (join), not only that the call returned: a
snapshot forks its worker later (services/snapshots/worker.py), and a fork must find this
process with one thread.
"""

from __future__ import annotations

import threading
from typing import Callable


class Background:
    def __init__(self, call: Callable[[], object], name: str | None = None) -> None:
        self._error: BaseException | None = None
        # A daemon: a command interrupted while the call runs must still be able to exit.
        self._thread = threading.Thread(target=self._run, args=(call,), name=name, daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:  # handed to the waiting thread by join/result
            self._error = exc

    def wait(self, seconds: float) -> bool:
        """Whether the thread has ended, waiting at most *seconds* for it."""
        self._thread.join(seconds)
        return not self._thread.is_alive()

    def join(self) -> BaseException | None:
        """Wait for the thread to end; what the call raised, if anything."""
        self._thread.join()
        return self._error

    def result(self) -> None:
        """Wait for the thread to end; raise what the call raised."""
        error = self.join()
        if error is not None:
            raise error
