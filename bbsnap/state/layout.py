"""Where bbsnap keeps things inside its data directory, and who may read them.

What a guest wrote is private (DESIGN §8): files are 0600, and libvirt's
dynamic ownership hands a disk chain to QEMU's user when a guest starts (it
chowns every layer, DESIGN §4: a 0600 root-owned backing image boots). QEMU's
user only needs to traverse the directories on the way to a disk: those are
0710 with QEMU's user's group (0711 where that group cannot be set, e.g. when
bbsnap does not run as root), so other users can neither list nor enter them.
Directories QEMU never opens (locks, logs, blank overlays) are 0700.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import stat
import uuid
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Iterator

from bbsnap import ids, private_dirs
from bbsnap.errors import BbsnapError, CataloguePathError
from bbsnap.lazy_dataclass import dataclass
from bbsnap.state.locks import DEFAULT_LOCK_TIMEOUT

DOMAIN_DIR_PREFIX = "dom-"  # servers/dom-<uuid>: a foreign domain's disks bbsnap made
REBUILD_JOURNAL = ".rebuilding"  # in a server's directory while a rebuild/revert runs

if TYPE_CHECKING:
    from bbsnap.config import Settings

DIR_MODE = 0o710          # owner, and QEMU's user through the directory's group
OPEN_DIR_MODE = 0o711     # no such group for us: others may traverse, never list
PRIVATE_DIR_MODE = 0o700  # directories QEMU never opens
FILE_MODE = 0o600         # images, overlays, logs, locks, the catalogue
PARTIAL_SUFFIX = ".partial"


RAM_ROOT = "/dev/shm"  # tmpfs on Linux (glibc's POSIX shared memory lives there)

_TARGET_TEMPLATE_NAME = re.compile(r"^blank-[0-9]+(-mapped)?\.qcow2$")


def _as_glob_id(image_id: str) -> str:
    """An image id about to become a glob pattern: a catalogue row's id is data too, and
    ``../../etc/passwd`` would make ``[.-]*`` match /etc/passwd- (refused, nothing removed)."""
    if not ids.is_valid(image_id, "img"):
        raise CataloguePathError(f"the catalogue has an image id {image_id!r} that is not an "
                                 "img- id; no files are removed for it")
    return image_id


@dataclass(frozen=True)
class DataDir:
    root: Path
    qemu_user: str = "libvirt-qemu"  # the user QEMU runs as (settings.qemu_user)
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT  # longest wait for a lock in here

    @classmethod
    def from_settings(cls, settings: "Settings") -> "DataDir":
        return cls(settings.data_dir, settings.qemu_user, settings.lock_timeout)

    @property
    def catalogue_path(self) -> Path:
        return self.root / "catalogue.sqlite3"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def tmp_dir(self) -> Path:
        """Work files of running jobs; anything here without a live job is garbage."""
        return self.root / "tmp"

    @property
    def ram_dir(self) -> Path:
        """Work files better kept in RAM than on disk (a memory snapshot's raw save file,
        which lives for seconds): this user's directory on tmpfs, shared by the user's data
        directories, each file named with its data directory's tag (ram_file)."""
        return Path(RAM_ROOT) / f"bbsnap-{os.getuid()}"

    def ram_file(self, name: str) -> Path:
        """*name* in ram_dir, prefixed with this data directory's tag; garbage like tmp/'s
        files once no job lives (remove_image_files looks there too)."""
        return self.ram_dir / f"{self._ram_tag()}.{name}"

    def ram_files(self) -> list[Path]:
        """This data directory's files in ram_dir and qemu_ram_dir (none in one while it is
        not to be trusted)."""
        return sorted(path for trusted in self._trusted_ram_dirs()
                      for path in trusted.glob(f"{self.ram_prefix}*"))

    def _trusted_ram_dirs(self) -> list[Path]:
        return [d for d in (self.trusted_ram_dir(), self.trusted_qemu_ram_dir()) if d]

    def trusted_ram_dir(self) -> Path | None:
        """ram_dir if it exists as a directory of ours nobody else can enter, else None;
        never made. Anything read or removed there goes through this: a symlink or another
        user's directory planted in the shared /dev/shm before bbsnap made its own could
        hold a file named like one of ours (a crafted save image stored as a guest's memory).
        Once it is ours, only we can rename or remove it (/dev/shm is sticky)."""
        with opened_ram_dir(self.ram_dir) as (fd, _refused):
            return None if fd is None else self.ram_dir

    @property
    def qemu_ram_dir(self) -> Path:
        """Work files that QEMU writes and that are better in RAM than on disk (a full
        copy's backup target: services/snapshots/targets.py): like ram_dir, but QEMU's user
        may enter it (0710, QEMU's group; 0700 when QEMU runs as us). Its files are named
        like ram_dir's (qemu_ram_file)."""
        return Path(RAM_ROOT) / f"bbsnap-{os.getuid()}-qemu"

    def qemu_ram_file(self, name: str) -> Path:
        return self.qemu_ram_dir / f"{self._ram_tag()}.{name}"

    def qemu_gid(self) -> int | None:
        """The group that lets QEMU's user into our directories (None: QEMU runs as us)."""
        return _qemu_gid(self.qemu_user)

    def trusted_qemu_ram_dir(self) -> Path | None:
        """qemu_ram_dir if it is a directory of ours only we and QEMU's user can enter,
        else None (the same rule as trusted_ram_dir); never made."""
        with opened_ram_dir(self.qemu_ram_dir, self.qemu_gid()) as (fd, _refused):
            return None if fd is None else self.qemu_ram_dir

    def ensure_qemu_ram_dir(self) -> Path | None:
        """qemu_ram_dir, made if missing; None when it is not to be trusted, or cannot be
        shared with QEMU's user alone (a user outside QEMU's group: 0711 would let anyone
        in, so the disk is used instead)."""
        gid = self.qemu_gid()
        try:
            self.qemu_ram_dir.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            pass  # judged below like any other
        except OSError:
            return None
        else:
            if gid is not None:
                try:
                    os.chown(self.qemu_ram_dir, -1, gid, follow_symlinks=False)
                    os.chmod(self.qemu_ram_dir, DIR_MODE)
                except OSError:
                    # QEMU's user could not enter it: of no use, so not left behind either.
                    with contextlib.suppress(OSError):
                        self.qemu_ram_dir.rmdir()
                    return None
        trusted = self.trusted_qemu_ram_dir()
        if trusted is not None and gid is not None and trusted.stat().st_gid != gid:
            return None  # ours, but QEMU's user could not open a file in it
        return trusted

    def is_qemu_ram_file(self, path: Path) -> bool:
        return path.parent == self.qemu_ram_dir

    @property
    def ram_prefix(self) -> str:
        """How the names of this data directory's files in ram_dir begin (ram_file)."""
        return f"{self._ram_tag()}."

    def _ram_tag(self) -> str:
        import zlib

        return f"{zlib.crc32(str(self.root.resolve()).encode()) & 0xFFFFFFFF:08x}"

    def ensure_ram_dir(self) -> Path | None:
        """ram_dir, made 0700 if missing; None when it cannot be made or is not a directory
        of ours that nobody else can enter (a symlink or someone else's directory planted
        in the shared /dev/shm is never used)."""
        try:
            self.ram_dir.mkdir(mode=0o700)
        except FileExistsError:
            pass  # judged below like any other
        except OSError:
            return None
        return self.trusted_ram_dir()

    @property
    def servers_dir(self) -> Path:
        """One directory per bbsnap server: its disk overlay, seed ISO and console log."""
        return self.root / "servers"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    @property
    def logs_dir(self) -> Path:
        """Logs of background workers (one per snapshot)."""
        return self.root / "logs"

    @property
    def blank_overlays_dir(self) -> Path:
        """Empty overlays on catalogue images (with their change-tracking bitmap), made once
        per image and disk size and copied for each new server disk."""
        return self.root / "blank-overlays"

    @property
    def quarantine_dir(self) -> Path:
        """What `doctor --fix` reclaimed, one directory per run (quarantine/<UTC time>/),
        deleted by a later `doctor --fix` after a grace period (services/doctor.py)."""
        return self.root / "quarantine"

    def blank_overlay(self, image_id: str, size: int) -> Path:
        return self.blank_overlays_dir / f"{image_id}-{size}.qcow2"

    def target_template(self, size: int, *, mapped: bool) -> Path:
        """The blank qcow2 each snapshot's backup target of *size* bytes is copied from
        (services/snapshots/targets.py), beside the images' blank overlays: theirs start
        with an image id, never with ``blank-``."""
        return self.blank_overlays_dir / f"blank-{size}{'-mapped' if mapped else ''}.qcow2"

    @staticmethod
    def is_target_template(name: str) -> bool:
        """Whether *name* in blank-overlays/ is a target template (doctor keeps them)."""
        return _TARGET_TEMPLATE_NAME.match(name) is not None

    def remove_blank_overlays(self, image_id: str) -> None:
        for path in self.blank_overlays_dir.glob(f"{_as_glob_id(image_id)}-*.qcow2"):
            path.unlink(missing_ok=True)

    def export_journal(self, token: str) -> Path:
        """An export's crash journal (it names the partial output), by the export's job token."""
        return self.tmp_dir / f"export.{token}.journal"

    def export_journals(self) -> list[tuple[str, Path]]:
        """Every export crash journal, with the job token of the export that wrote it."""
        return [(path.name[len("export."):-len(".journal")], path)
                for path in self.tmp_dir.glob("export.*.journal")]

    def rebuild_journals(self) -> list[Path]:
        """Every rebuild journal (services/rebuild_journal.py): bbsnap servers' and foreign
        domains'. Here, so each command's recovery looks without importing that module."""
        return sorted(self.servers_dir.glob(f"srv-*/{REBUILD_JOURNAL}")) + \
            sorted(self.servers_dir.glob(f"{DOMAIN_DIR_PREFIX}*/{REBUILD_JOURNAL}"))

    def server_dir(self, server_id: str) -> Path:
        return self.servers_dir / server_id

    def domain_dir(self, domain_uuid: str) -> Path:
        """The directory of a domain bbsnap did not create, once a revert gave it disks
        (services/server_disks.py): by UUID, as a domain's name may be any text."""
        return self.servers_dir / f"{DOMAIN_DIR_PREFIX}{uuid.UUID(domain_uuid)}"

    def image_file(self, image_id: str, fmt: str = "qcow2") -> Path:
        return self.images_dir / f"{image_id}.{fmt}"

    def image_path(self, stored: str) -> Path:
        """The file a catalogue ``path`` (image or volume) names, inside images/ or refused.

        The catalogue is a file too: a row edited (or restored) to name ``/etc/shadow``,
        ``../x`` or a symlink leading out would make destroy delete and export serve a
        host file. Only a relative name without ``..`` that resolves (symlinks followed)
        strictly inside images/ is accepted; the returned path is images/ joined with it.
        """
        name = PurePosixPath(stored)
        if not stored or name.is_absolute() or ".." in name.parts or "\0" in stored:
            raise CataloguePathError(f"the catalogue names the image file {stored!r}, which "
                                     f"is not a file name inside {self.images_dir}")
        path = self.images_dir / name
        inside, resolved = self.images_dir.resolve(), path.resolve()
        if resolved == inside or not resolved.is_relative_to(inside):
            raise CataloguePathError(f"the catalogue's image file {stored!r} resolves to "
                                     f"{resolved}, not to a file inside {self.images_dir}")
        return path

    def remove_image_files(self, image_id: str) -> None:
        """Every file of an image that never became available: work files in tmp/ and
        anything renamed into images/ (an interrupted job's final file is as untrusted as
        its partial one). Matches ``img-xxxxx.*`` and volumes ``img-xxxxx-vdb.qcow2``."""
        for directory in (self.tmp_dir, self.images_dir):
            for path in directory.glob(f"{_as_glob_id(image_id)}[.-]*"):
                path.unlink(missing_ok=True)
        for ram_dir in self._trusted_ram_dirs():
            for path in ram_dir.glob(f"{self.ram_prefix}{_as_glob_id(image_id)}[.-]*"):
                path.unlink(missing_ok=True)

    def ensure(self) -> "DataDir":
        """Create the directories (idempotent) private to us and QEMU's user; make the
        catalogue 0600 before SQLite opens it (its -wal and -shm get the main file's mode).

        Existing directories are never loosened: one that others could read (an older
        bbsnap made them 0755, its files 0644) is tightened once, with what it holds.
        Parents are left alone: changing a home directory's mode behind the user's
        back is not ours to do.
        """
        gid = _qemu_gid(self.qemu_user)
        try:
            # QEMU opens disks in these (backup targets in tmp/), so its user traverses them.
            for directory in (self.root, self.images_dir, self.tmp_dir, self.servers_dir):
                _ensure_dir(directory, shared=True, qemu_gid=gid)
            for directory in (self.locks_dir, self.logs_dir, self.blank_overlays_dir):
                _ensure_dir(directory, shared=False, qemu_gid=gid)
            _private_catalogue(self.catalogue_path)
        except OSError as exc:
            raise BbsnapError(f"cannot prepare data directory {self.root}: {exc.strerror}",
                              hint="choose another with --data-dir or BBSNAP_HOME") from exc
        return self

    def make_dir(self, path: Path) -> None:
        """A new directory QEMU's user may traverse (a server's); FileExistsError if it exists."""
        path.mkdir(mode=PRIVATE_DIR_MODE)
        _share_with_qemu(path, _qemu_gid(self.qemu_user))


@contextlib.contextmanager
def opened_ram_dir(path: Path, qemu_gid: int | None = None
                   ) -> Iterator[tuple[int | None, str]]:
    """A descriptor of the ram_dir at *path* and "", or None and why it is not to be used
    ("" when it does not exist): the one place that decides whether it is ours
    (private_dirs.refusal), for DataDir.trusted_ram_dir and ensure_ram_dir as for doctor's reading
    of it (services/ram_reclaim.py). Judged on the descriptor itself (O_NOFOLLOW: a symlink
    is never followed), so a caller reading through the descriptor reads nothing planted
    between the check and the reading."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None, ""
        return
    except OSError:  # a symlink (ELOOP), not a directory (ENOTDIR), not ours to enter
        try:
            refused = private_dirs.refusal(path.lstat()) or "it cannot be opened"
        except OSError as exc:
            refused = f"it cannot be read ({exc.strerror})"
        yield None, refused
        return
    try:
        refused = private_dirs.refusal(os.fstat(fd), group_may_enter=qemu_gid)
        yield (None if refused else fd), refused
    finally:
        os.close(fd)


def _qemu_gid(user: str) -> int | None:
    """The group that gives QEMU's user, and as few others as may be, into our directories;
    None when there is no such user here (qemu:///session: QEMU runs as us).

    Debian's libvirt-qemu has the primary group kvm, which users get for /dev/kvm; its
    own group libvirt-qemu holds only itself (libvirt starts QEMU with both): prefer that.
    """
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    try:
        own = grp.getgrnam(user)
    except KeyError:
        return entry.pw_gid
    return own.gr_gid if user in own.gr_mem else entry.pw_gid


def _share_with_qemu(path: Path, gid: int | None) -> None:
    """0710 with QEMU's group: only the owner lists it, only QEMU's user enters it. The
    group can be set by root (or a member); otherwise 0711 keeps QEMU working."""
    if gid is not None:
        try:
            os.chown(path, -1, gid, follow_symlinks=False)
            os.chmod(path, DIR_MODE)
            return
        except PermissionError:
            pass
    os.chmod(path, OPEN_DIR_MODE)


def _ensure_dir(path: Path, *, shared: bool, qemu_gid: int | None) -> None:
    """Create *path* 0700 (then shared with QEMU's user if *shared*), or tighten it."""
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
    except FileExistsError:
        if _tighten_dir(path, shared=shared, qemu_gid=qemu_gid):
            _tighten_contents(path, shared=shared, qemu_gid=qemu_gid)
        return
    if shared:
        _share_with_qemu(path, qemu_gid)


def _tighten_dir(path: Path, *, shared: bool, qemu_gid: int | None) -> bool:
    """Take away what others may do in *path*, never adding anything: whether others could
    list or write it (then what it holds is tightened too).

    In a *shared* directory QEMU's user keeps the traversal it had (o+x becomes its
    group's x). Sticky directories (/tmp-like, shared on purpose) are left as they are.
    """
    info = os.lstat(path)
    mode = stat.S_IMODE(info.st_mode)
    beyond = 0o067 if shared else 0o077  # what the target mode (0710, 0700) does not grant
    if not stat.S_ISDIR(info.st_mode) or mode & stat.S_ISVTX or not mode & beyond:
        return False
    if not shared:
        os.chmod(path, mode & 0o700)
    elif mode & 0o001:
        _share_with_qemu(path, qemu_gid)
    else:
        os.chmod(path, mode & ~0o066)
    # Its contents were exposed only if others could list or write it: a shared 0711 (a
    # normal user's, passable only) is not re-tightened on every command, which chmod'ed
    # away the ACL that keeps its owner reading images libvirt handed to QEMU's user.
    return bool(mode & (0o066 if shared else 0o077))


def _tighten_contents(directory: Path, *, shared: bool, qemu_gid: int | None) -> None:
    """What an older bbsnap left readable: files 0600 (libvirt hands disks to QEMU's user
    on start), directories as their parent."""
    for entry in os.scandir(directory):
        if entry.is_symlink():
            continue
        if entry.is_dir():
            if _tighten_dir(Path(entry.path), shared=shared, qemu_gid=qemu_gid):
                _tighten_contents(Path(entry.path), shared=shared, qemu_gid=qemu_gid)
        elif entry.is_file():
            _tighten_file(Path(entry.path))


def _tighten_file(path: Path) -> None:
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    if mode & 0o077:
        try:
            os.chmod(path, mode & 0o700)
        except PermissionError:
            pass  # chowned to QEMU's user by libvirt, and we are not root: its owner's now


def _private_catalogue(path: Path) -> None:
    """Create the catalogue 0600 before SQLite does (it would make it 0644 and give its
    WAL the same mode); tighten one an older bbsnap made, and its -wal and -shm.

    An existing catalogue is never opened here: closing any descriptor of a file drops every
    POSIX lock this process holds on it, SQLite's included, and another process closing its
    connection would then take ours for gone and delete the WAL and shared-memory files
    under it (seen: an in-process `--wait` read a deleted WAL and waited forever). Only a
    file that does not exist yet, which nothing here can have open, is created.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            _tighten_file(name)
        except FileNotFoundError:
            pass
