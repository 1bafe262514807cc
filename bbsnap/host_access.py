"""Whether the QEMU of a libvirt connection can reach the data directory, and which
connection a data directory belongs to.

Under ``qemu:///system`` QEMU runs as its own user (``qemu_user``, ``libvirt-qemu``): every
directory from ``/`` down to the data directory must let that user pass (execute). A
normal user's home is 0700 on Debian 12 (``adduser``'s default), so it does not. The fix
is the one virt-manager offers: an ACL entry granting exactly execute to QEMU's user on
the directories that block it (``setfacl -m u:libvirt-qemu:x DIR``) — never opening a home
to everyone. Under ``qemu:///session`` QEMU runs as the user, who owns the data directory.

A data directory records the connection it is used with (``DATA/connection.json``): its
files were handed to that QEMU (libvirt's dynamic ownership chowns disks to QEMU's user)
and its servers are domains of that connection, so another connection's QEMU cannot use
them and its libvirt does not know them.
"""

from __future__ import annotations

import json
import os
import pwd
import struct
from pathlib import Path
from urllib.parse import urlsplit

from bbsnap import proc
from bbsnap.errors import ConflictError
from bbsnap.lazy_dataclass import dataclass

CONNECTION_RECORD = "connection.json"

# Linux's POSIX ACL xattr (system.posix_acl_access): a 4-byte version header, then
# (tag u16, perm u16, id u32) entries. See acl(5) for the access check below.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_EXECUTE = 0x1


@dataclass(frozen=True)
class QemuUser:
    """The account QEMU runs as under a connection."""
    name: str
    uid: int
    gids: frozenset[int]


def is_local_qemu(uri: str) -> bool:
    """A qemu:// connection on this host (not qemu+ssh://elsewhere, not test:///)."""
    parts = urlsplit(uri)
    return parts.scheme.split("+")[0] == "qemu" and parts.hostname in (None, "", "localhost")


def is_system(uri: str) -> bool:
    return is_local_qemu(uri) and urlsplit(uri).path.rstrip("/") == "/system"


def qemu_user_for(uri: str, qemu_user: str) -> QemuUser | None:
    """Who QEMU runs as: *qemu_user* under a local qemu:///system, else None (the session's
    QEMU is the user, another host's or the test driver's reads nothing here). None too when
    that account does not exist (then nothing can be checked)."""
    if not is_system(uri):
        return None
    try:
        entry = pwd.getpwnam(qemu_user)
    except KeyError:
        return None
    return QemuUser(entry.pw_name, entry.pw_uid,
                    frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid)))


def may_traverse(path: Path, user: QemuUser) -> bool:
    """Whether *user* may pass through directory *path* (execute), by its mode and ACL."""
    info = path.stat()
    if user.uid == 0:
        return True
    acl = _read_acl(path)
    if info.st_uid == user.uid:
        return bool(info.st_mode & 0o100)
    if acl:
        mask = acl.get((_MASK, -1), 0o7)
        named = acl.get((_USER, user.uid))
        if named is not None:
            return bool(named & mask & _EXECUTE)
        # Group entries: the owning group and named groups; any that matches and allows.
        groups = [perm for (tag, ident), perm in acl.items()
                  if (tag == _GROUP_OBJ and info.st_gid in user.gids)
                  or (tag == _GROUP and ident in user.gids)]
        if groups:
            return any(perm & mask & _EXECUTE for perm in groups)
        return bool(acl.get((_OTHER, -1), 0) & _EXECUTE)
    if info.st_gid in user.gids:
        return bool(info.st_mode & 0o010)
    return bool(info.st_mode & 0o001)


def _read_acl(path: Path) -> dict[tuple[int, int], int]:
    """The access ACL's entries {(tag, id or -1): perm}; empty when there is none."""
    try:
        raw = os.getxattr(path, _ACL_XATTR)
    except OSError:
        return {}  # no ACL (ENODATA), or a filesystem without them: the mode decides
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != _ACL_VERSION:
        return {}
    entries = {}
    for offset in range(4, len(raw) - 7, 8):
        tag, perm, ident = struct.unpack_from("<HHI", raw, offset)
        entries[(tag, ident if tag in (_USER, _GROUP) else -1)] = perm
    return entries


def blocked_directories(target: Path, user: QemuUser) -> list[Path]:
    """The existing directories on the way to *target* (itself included) that *user*
    cannot pass, outermost first."""
    path = target.absolute()
    chain = [*reversed(path.parents), path]
    return [p for p in chain if p.is_dir() and not may_traverse(p, user)]


def grant_command(directory: Path, user: QemuUser) -> list[str]:
    """The exact command that lets *user* pass *directory* and nothing more."""
    return ["setfacl", "-m", f"u:{user.name}:x", str(directory)]


def fixable_by_me(directory: Path) -> bool:
    """Only a directory's owner (or root) may change its ACL."""
    return os.geteuid() == 0 or directory.stat().st_uid == os.geteuid()


def grant_traversal(directories: list[Path], user: QemuUser) -> list[Path]:
    """Run the grant for each directory this user may change; returns those granted."""
    done = []
    for directory in directories:
        if fixable_by_me(directory):
            proc.run(grant_command(directory, user), timeout=30)
            done.append(directory)
    return done


def hands_files_to_qemu(uri: str) -> bool:
    """A normal user on qemu:///system: libvirt (root) hands this user's files to QEMU's
    user, and files it makes itself are root's."""
    return os.geteuid() != 0 and is_system(uri)


def keep_my_access(paths: list[Path], uri: str) -> None:
    """Before a guest starts on qemu:///system as a normal user: let the owner keep reading
    *paths* (catalogue images) once libvirt hands them to QEMU's user.

    libvirt chowns a guest's whole backing chain to QEMU's user on start and gives back
    only the top layer when it stops, so a normal user could no longer export, check or
    clone from their own images. chown leaves ACLs alone: a named entry for the owner
    (``setfacl -m u:ME:rw``) keeps them theirs to read, and no one else's.
    """
    if not hands_files_to_qemu(uri):
        return
    me = os.geteuid()
    todo = [p for p in paths if p.exists() and p.stat().st_uid == me
            and (_USER, me) not in _read_acl(p)]
    if todo:
        proc.run(["setfacl", "-m", f"u:{me}:rw", *map(str, todo)], timeout=60)


def group_bits_are_mine(path: Path) -> bool:
    """Whether a file's group permission bits are only the ACL mask over a named entry for
    this user (keep_my_access), not a group or anyone else's access."""
    acl = _read_acl(path)
    if not acl or acl.get((_GROUP_OBJ, -1), 0):
        return False
    others = [key for key in acl if key[0] == _GROUP or (key[0] == _USER and key[1] != os.geteuid())]
    return not others


# -- the data directory's connection ---------------------------------------------------------

def recorded_connection(root: Path) -> str | None:
    """The connection a data directory was used with, or None (new, or made before the
    record existed). A damaged record is treated as none (it is rewritten)."""
    try:
        data = json.loads((root / CONNECTION_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    uri = data.get("connect") if isinstance(data, dict) else None
    return uri if isinstance(uri, str) and uri else None


def refuse_other_connection(root: Path, uri: str) -> None:
    """Refuse *uri* for a data directory recorded for another local QEMU connection.

    Only local qemu:// connections are recorded and compared: the test driver and remote
    hosts run no QEMU on these files.
    """
    recorded = recorded_connection(root)
    if recorded is None or recorded == uri or not is_local_qemu(uri) \
            or not is_local_qemu(recorded):
        return
    raise ConflictError(
        f"the data directory {root} belongs to {recorded}, not {uri}: its servers are "
        f"domains of {recorded} and its files were handed to that connection's QEMU",
        hint=f"use -c {recorded} with it, or give {uri} its own --data-dir")


def needs_record(root: Path, uri: str) -> bool:
    return is_local_qemu(uri) and recorded_connection(root) is None


def record_connection(root: Path, uri: str) -> None:
    """Record *uri* as the data directory's connection (after it answered: a connection
    that failed must not claim the directory)."""
    if needs_record(root, uri):
        _write_record(root, uri)


def require_reachable(root: Path, uri: str, qemu_user: str) -> None:
    """Refuse, before anything is made, an operation whose QEMU could not open its files."""
    qemu = qemu_user_for(uri, qemu_user)
    if qemu is None:
        return
    blocked = blocked_directories(root, qemu)
    if blocked:
        raise ConflictError(
            f"QEMU's user {qemu.name} cannot enter {blocked[0]} "
            f"(mode {blocked[0].stat().st_mode & 0o777:04o}), on the way to the data "
            f"directory {root}",
            hint="'bbsnap doctor --fix' grants it passage with "
                 f"'setfacl -m u:{qemu.name}:x' on the directories that need it")


def _write_record(root: Path, uri: str) -> None:
    """Atomically (temporary name, rename): a killed command leaves no half-written record."""
    temporary = root / f".{CONNECTION_RECORD}.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"connect": uri}, handle)
            handle.write("\n")
        os.replace(temporary, root / CONNECTION_RECORD)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
