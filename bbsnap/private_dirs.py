"""Whether a directory in a place everyone can write (/tmp, /dev/shm) is ours alone.

Built-in modules only: the command server's client imports this on every `bbsnap` start.
"""

from __future__ import annotations

import os
import stat


def refusal(info: os.stat_result, *, group_may_enter: int | None = None) -> str:
    """Why a directory with *info* (lstat: a symlink is not followed) must be neither used
    nor trusted, "" when it is a directory of ours nobody else can enter (but the group
    *group_may_enter*, when it is the directory's, which may traverse it: QEMU's user's).
    /tmp and /dev/shm are everyone's: what stands at our name may have been planted before
    we made it."""
    if stat.S_ISLNK(info.st_mode):
        return "it is a symlink"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    if info.st_uid != os.getuid():
        return f"it belongs to uid {info.st_uid}, not to you"
    entering = 0o010 if group_may_enter is not None and info.st_gid == group_may_enter else 0
    if info.st_mode & 0o077 & ~entering:
        return f"others can enter it (mode {stat.S_IMODE(info.st_mode):04o})"
    return ""

