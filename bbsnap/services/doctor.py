"""`bbsnap doctor`: check the host and the data directory, and say exactly how to fix things.

Each check returns Findings; a finding that is not ok carries the command or change that
fixes it. `--fix` runs the crash recovery every command runs, checkpoints the catalogue,
and moves what is provably orphaned into a quarantine it empties after a grace period
(services/reclaim.py says what proves it); nothing is deleted on the strength of an empty
catalogue or another libvirt connection.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..catalogue import Catalogue
from ..config import Settings
from ..errors import BbsnapError
from ..hypervisor import Hypervisor
from ..jobs import job_alive
from ..layout import DataDir
from . import reclaim
from .reclaim import Batch, Orphan, Survey

__all__ = ["Doctor", "Finding", "Orphan", "Reclaimed"]

# A WAL this small is what a running job's last commits leave; more means nobody
# checkpointed it, and a copy of catalogue.sqlite3 alone misses those rows.
SMALL_WAL_FRAMES = 64


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False   # worth knowing, not a failure


@dataclass(frozen=True)
class Reclaimed:
    """What one `doctor --fix` did to the quarantine."""
    batch: Path | None          # where this run's orphans went
    moved: list[Orphan]
    purged: list[Batch]         # older batches deleted


class Doctor:
    """*catalogue* None: it could not be opened (*catalogue_error* says why); then it
    proves nothing about image files and they are all undecidable."""

    def __init__(self, settings: Settings, data_dir: DataDir, catalogue: Catalogue | None,
                 hypervisor: Callable[[], Hypervisor], catalogue_error: str = "") -> None:
        self._settings = settings
        self._data_dir = data_dir
        self._catalogue = catalogue
        self._catalogue_error = catalogue_error
        self._hypervisor = hypervisor

    def run(self) -> list[Finding]:
        findings = [*self._hypervisor_checks(), *self._tool_checks(), self._kvm_check(),
                    *self._permission_checks(), *self._confinement_hints(),
                    self._catalogue_check(), self._stale_jobs_check()]
        found = self.survey()
        wasted = sum(o.size for o in found.orphans)
        findings.append(Finding(
            "orphaned files", not found.orphans,
            f"{len(found.orphans)} files hold {_bytes(wasted)}" if found.orphans else "none",
            fix="bbsnap doctor --fix (moves them into quarantine)" if found.orphans else ""))
        if found.undecidable:
            findings.append(self._undecidable_finding(found))
        findings.append(self._quarantine_check())
        return findings

    # -- checks ------------------------------------------------------------------------------

    def _hypervisor_checks(self) -> list[Finding]:
        try:
            version = self._hypervisor().version()
        except BbsnapError as exc:
            return [Finding("libvirt", False, str(exc),
                            fix="start it: scripts/setup (or: virtlogd -d && libvirtd -d)")]
        libvirt_ok = version.libvirt >= (7, 2, 0)
        qemu_ok = version.qemu >= (4, 2, 0)
        return [
            Finding("libvirt", libvirt_ok,
                    f"{'.'.join(map(str, version.libvirt))} on {self._settings.connect}"
                    + ("" if libvirt_ok else "; live snapshots need push-mode backup (>= 7.2)"),
                    fix="" if libvirt_ok else "upgrade libvirt to 7.2 or newer"),
            Finding("QEMU", qemu_ok, ".".join(map(str, version.qemu))
                    + ("" if qemu_ok else "; push-mode backup needs QEMU >= 4.2"),
                    fix="" if qemu_ok else "upgrade QEMU to 4.2 or newer"),
        ]

    def _tool_checks(self) -> list[Finding]:
        findings = [self._qemu_img_check()]
        for tool in ("qemu-img", "qemu-io", "qemu-nbd", "qemu-system-x86_64"):
            path = shutil.which(tool)
            findings.append(Finding(tool, path is not None, path or "not installed",
                                    fix="" if path else "scripts/setup (package qemu-utils / "
                                                        "qemu-system-x86)"))
        return findings

    def _qemu_img_check(self) -> Finding:
        """qemu-img >= 6.1 refuses overlays without a backing format; bbsnap always gives one
        (-F), which needs qemu-img to know the option (any 2.x or newer)."""
        from .. import proc

        try:
            text = proc.run(["qemu-img", "--version"], timeout=30).stdout
        except BbsnapError as exc:
            return Finding("qemu-img version", False, str(exc), fix="scripts/setup")
        match = re.search(r"version (\d+)\.(\d+)", text)
        version = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
        ok = version >= (4, 2)
        return Finding("qemu-img version", ok,
                       f"{version[0]}.{version[1]} "
                       "(backing formats, convert -B, map --output=json)",
                       fix="" if ok else "upgrade qemu-utils to 4.2 or newer")

    def _kvm_check(self) -> Finding:
        from ..accel import probe_kvm

        probe = probe_kvm()
        return Finding("KVM", True, ("usable: " if probe.usable else "not usable, TCG will be "
                                     "used: ") + probe.reason, warning=not probe.usable,
                       fix="nothing to do: --accel auto picks tcg; override with --accel or "
                           "BBSNAP_ACCEL=kvm|tcg")

    def _permission_checks(self) -> list[Finding]:
        """QEMU runs as qemu_user: every directory on the way must be traversable by it."""
        try:
            user = pwd.getpwnam(self._settings.qemu_user)
        except KeyError:
            return [Finding("QEMU user", True, f"no user {self._settings.qemu_user} here "
                            "(QEMU may run as you: qemu:///session)", warning=True)]
        blocked = [p for p in [self._data_dir.root, *self._data_dir.root.parents]
                   if p.exists() and not _traversable_by(p, user.pw_uid, user.pw_gid)]
        if blocked:
            return [Finding("data directory access", False,
                            f"{self._settings.qemu_user} cannot enter {blocked[0]}",
                            fix=f"chmod o+x {blocked[0]}  (or choose another --data-dir)")]
        # Images are 0600: libvirt's dynamic ownership hands them to QEMU's user on start.
        # What is wrong is an image others can read (copied in by hand, restored from backup).
        exposed = [p for p in self._data_dir.images_dir.glob("*.qcow2")
                   if p.stat().st_mode & 0o077]
        if exposed:
            return [Finding("image files", False, f"{len(exposed)} image files can be read "
                            f"by other users (e.g. {exposed[0]})",
                            fix=f"chmod go-rwx {self._data_dir.images_dir}/*.qcow2")]
        return [Finding("data directory access", True,
                        f"{self._data_dir.root} is reachable by {self._settings.qemu_user}")]

    def _confinement_hints(self) -> list[Finding]:
        hints = []
        if Path("/sys/kernel/security/apparmor").exists():
            hints.append(Finding(
                "AppArmor", True, "active: libvirt's per-guest profiles must allow the whole "
                "backing chain (images under the data directory)", warning=True,
                fix="if guests fail with 'Permission denied' on an image, add the data "
                    "directory to /etc/apparmor.d/local/abstractions/libvirt-qemu"))
        if Path("/sys/fs/selinux/enforce").exists():
            hints.append(Finding(
                "SELinux", True, "present: image files need the virt_image_t label",
                warning=True, fix=f"semanage fcontext -a -t virt_image_t "
                                  f"'{self._data_dir.root}(/.*)?' && restorecon -R "
                                  f"{self._data_dir.root}"))
        return hints

    def _catalogue_check(self) -> Finding:
        """DESIGN §8: the main file alone holds every committed row (a backup of it is whole)."""
        if self._catalogue is None:
            return Finding("catalogue", False, self._catalogue_error,
                           fix="restore catalogue.sqlite3 from a backup, or move the files "
                               "out of images/ (nothing is reclaimed until then)")
        frames = self._catalogue.wal_frames()
        name = self._catalogue.wal_path.name
        if frames <= SMALL_WAL_FRAMES:
            return Finding("catalogue", True, f"checkpointed: {self._catalogue.path.name} "
                           "alone holds every committed row")
        running = any(job_alive(i.job) for i in self._catalogue.creating())
        detail = (f"{frames} pages of committed changes are only in {name}: a copy of "
                  f"{self._catalogue.path.name} alone, or a deleted {name}, loses them")
        if running:
            return Finding("catalogue", True, detail + " (a running job checkpoints it when "
                           "it ends)", warning=True, fix="back it up after the job ends")
        return Finding("catalogue", False, detail,
                       fix=f"bbsnap doctor --fix (checkpoints it); never delete {name}")

    def _stale_jobs_check(self) -> Finding:
        stale = [i.id for i in self._catalogue.creating() if not job_alive(i.job)] \
            if self._catalogue is not None else []
        exports = [t for t, _path in self._data_dir.export_journals() if not job_alive(t)]
        creates = [p.parent.name for p in self._data_dir.servers_dir.glob("srv-*/.creating")
                   if not job_alive(_marker_token(p))]
        stale += [f"export (pid {t.split(':')[0]})" for t in exports]
        stale += [f"servers create {c}" for c in creates]
        return Finding("stale jobs", not stale, ", ".join(stale) if stale else "none",
                       fix="bbsnap doctor --fix (any bbsnap command also recovers them)"
                       if stale else "")

    def _undecidable_finding(self, found: Survey) -> Finding:
        first = found.undecidable[0]
        total = sum(u.size for u in found.undecidable)
        return Finding(
            "undecidable files", True,
            f"{len(found.undecidable)} files or server directories hold {_bytes(total)} and "
            f"are kept: nothing proves them unused (e.g. {first.path.name}: {first.reason})",
            warning=True,
            fix="if they are not yours any more, move them away yourself; for a server made "
                "on another connection, run doctor with -c that URI")

    def _quarantine_check(self) -> Finding:
        held = reclaim.batches(self._data_dir)
        if not held:
            return Finding("quarantine", True, "empty")
        now = datetime.now(timezone.utc)
        due = [b for b in held if reclaim.expired(b, now)]
        total = sum(b.size for b in held)
        detail = (f"{len(held)} batches in {self._data_dir.quarantine_dir} hold "
                  f"{_bytes(total)}, oldest {held[0].path.name}")
        grace = reclaim.QUARANTINE_GRACE.days
        return Finding("quarantine", True, detail, warning=bool(due),
                       fix=f"bbsnap doctor --fix deletes batches older than {grace} days "
                           f"({len(due)} now); move a file back to undo its reclaiming")

    # -- orphans -----------------------------------------------------------------------------

    def survey(self) -> Survey:
        return reclaim.survey(self._data_dir, self._catalogue, self._settings.connect,
                              lambda: self._hypervisor().list_domains())

    def orphans(self) -> list[Orphan]:
        return self.survey().orphans

    def fix(self) -> Reclaimed:
        """Empty expired quarantine batches, then move this run's orphans into a new one.
        Run crash recovery first: its files are then no longer mistaken for orphans."""
        purged = reclaim.purge(self._data_dir)
        batch, moved = reclaim.quarantine(self._data_dir, self.orphans())
        if self._catalogue is not None:
            self._catalogue.checkpoint()
        return Reclaimed(batch, moved, purged)


def _traversable_by(path: Path, uid: int, gid: int) -> bool:
    info = path.stat()
    if uid == 0 or info.st_mode & 0o001:
        return True
    if info.st_uid == uid:
        return bool(info.st_mode & 0o100)
    groups = {gid, *os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)}
    return info.st_gid in groups and bool(info.st_mode & 0o010)


def _marker_token(marker: Path) -> str:
    try:
        return marker.read_text().split()[0]
    except (OSError, IndexError):
        return ""


def _bytes(size: int) -> str:
    return f"{size} bytes ({size / (1024 * 1024):.1f} MiB)"
