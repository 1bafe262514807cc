"""The work files of a memory revert in tmp/ (services/memory_restore.py), and their removal
after a killed one: named by the job token of the process that made them, so the next
command (crash recovery, through ``memory_restore.remove_stale``) removes those whose
process died. A module of its own: what names and removes them needs none of the revert's
decompressors and threads.
"""

from __future__ import annotations

from pathlib import Path

from bbsnap.state.layout import DataDir
from bbsnap.state.process_tokens import job_alive

PREFIX = "restore."
SUFFIX = ".save"        # an unpacked memory file (the fallback)
FIFO_SUFFIX = ".fifo"   # the FIFO a restore reads the memory file from


def restore_file(data_dir: DataDir, token: str) -> Path:
    return data_dir.tmp_dir / f"{PREFIX}{token}{SUFFIX}"


def restore_fifo(data_dir: DataDir, token: str) -> Path:
    return data_dir.tmp_dir / f"{PREFIX}{token}{FIFO_SUFFIX}"


def remove_stale(data_dir: DataDir) -> list[Path]:
    """Unpacked memory files and FIFOs of reverts whose process died (libvirtd keeps what
    it opened)."""
    removed = []
    for suffix in (SUFFIX, FIFO_SUFFIX):
        for path in data_dir.tmp_dir.glob(f"{PREFIX}*{suffix}"):
            token = path.name[len(PREFIX):-len(suffix)]
            if not job_alive(token):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
