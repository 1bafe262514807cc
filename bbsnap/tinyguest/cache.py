"""The per-machine cache directory and the file-system steps that keep it sane
when builds are killed or run concurrently: one lock per cache, builds in
``.tmp-*`` work directories, and publishing by rename.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
from pathlib import Path
from typing import Self

from bbsnap.errors import BbsnapError
from bbsnap.lazy_dataclass import dataclass


def default_cache_dir() -> Path:
    """``$BBSNAP_CACHE``; else /var/cache/bbsnap for root; else the XDG cache dir."""
    env = os.environ.get("BBSNAP_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/bbsnap")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "bbsnap"


def guest_root(cache_dir: Path | None = None) -> Path:
    """The tiny guest's part of the cache; one subdirectory per cache key."""
    return (cache_dir or default_cache_dir()) / "tiny-guest"


@dataclass
class BuildLock:
    """An exclusive flock held for the ``with`` block; closes its fd on exit."""

    fd: int

    def __enter__(self) -> Self:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *_exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def build_lock(root: Path) -> BuildLock:
    """One builder per cache at a time; the lock dies with its process.

    Never through a symlink: root would otherwise create (or lock) any file one names.
    """
    path = root / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise BbsnapError(f"cannot open the cache lock {path}: {exc.strerror or exc}",
                          hint="it must be a regular file (not a symlink)") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BbsnapError(f"the cache lock {path} is not a regular file")
    return BuildLock(fd)


def remove_stale_work_dirs(root: Path) -> None:
    # Holding the lock, any .tmp-* left is from a killed build.
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(".old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def publish(out: Path, target: Path) -> None:
    """Move a finished build into place; a forced rebuild retires the old one."""
    os.chmod(out, 0o755)   # QEMU's user must reach a backing file in here
    if target.exists():
        retired = target.with_name(f".old-{target.name}-{os.getpid()}")
        target.rename(retired)
        shutil.rmtree(retired, ignore_errors=True)
    out.rename(target)


def make_shared_dir(path: Path) -> None:
    """mkdir -p: what we create is 0755 so QEMU's user can reach images below it.

    An existing directory is left as it is: never loosened (DESIGN §8), never chmod-ed
    through a symlink someone put in its place.
    """
    missing = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o755)
        except FileExistsError:
            continue  # a concurrent build made it: theirs, as it is
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o755)  # the umask may have taken bits away
        finally:
            os.close(fd)
