"""`bbsnap doctor`: check the host and the data directory, and say exactly how to fix things.

Each check returns Findings; a finding that is not ok carries the command or change that
fixes it. `--fix` recovers stale jobs as every command does, and only deletes what is
provably orphaned: files no catalogue row, running job or libvirt domain refers to.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..catalogue import Catalogue
from ..config import Settings
from ..errors import BbsnapError
from ..hypervisor import Hypervisor
from ..jobs import job_alive
from ..layout import DataDir
from ..models import ImageFilter, ImageStatus

_ID_PREFIX = re.compile(r"^(img-[0-9a-z]{5})")


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False   # worth knowing, not a failure


@dataclass(frozen=True)
class Orphan:
    path: Path
    size: int


class Doctor:
    def __init__(self, settings: Settings, data_dir: DataDir, catalogue: Catalogue,
                 hypervisor: Callable[[], Hypervisor]) -> None:
        self._settings = settings
        self._data_dir = data_dir
        self._catalogue = catalogue
        self._hypervisor = hypervisor

    def run(self) -> list[Finding]:
        findings = [*self._hypervisor_checks(), *self._tool_checks(), self._kvm_check(),
                    *self._permission_checks(), *self._confinement_hints(),
                    self._stale_jobs_check()]
        orphans = self.orphans()
        wasted = sum(o.size for o in orphans)
        findings.append(Finding(
            "orphaned files", not orphans,
            f"{len(orphans)} files hold {wasted // (1024 * 1024)} MiB" if orphans else "none",
            fix="bbsnap doctor --fix" if orphans else ""))
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
                       f"{version[0]}.{version[1]} (backing formats, convert -B, map --output=json)",
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
        unreadable = [p for p in self._data_dir.images_dir.glob("*.qcow2")
                      if not p.stat().st_mode & 0o004 and p.stat().st_uid != user.pw_uid]
        if unreadable:
            return [Finding("image files", False, f"{len(unreadable)} image files are not "
                            f"readable by {self._settings.qemu_user} (e.g. {unreadable[0]})",
                            fix=f"chmod o+r {self._data_dir.images_dir}/*.qcow2")]
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

    def _stale_jobs_check(self) -> Finding:
        stale = [i.id for i in self._catalogue.creating() if not job_alive(i.job)]
        return Finding("stale jobs", not stale, ", ".join(stale) if stale else "none",
                       fix="bbsnap doctor --fix (any bbsnap command also recovers them)"
                       if stale else "")

    # -- orphans -----------------------------------------------------------------------------

    def orphans(self) -> list[Orphan]:
        rows = self._catalogue.find(ImageFilter(include_deleted=True))
        kept = {i.path for i in rows if i.status is not ImageStatus.DELETED and i.path}
        for image in rows:
            kept.update(v.path for v in self._catalogue.volumes(image.id))
        busy = {i.id for i in rows if i.status is ImageStatus.CREATING and job_alive(i.job)}
        found = []
        for path in self._data_dir.images_dir.iterdir():
            match = _ID_PREFIX.match(path.name)
            if path.name not in kept and not (match and match.group(1) in busy):
                found.append(Orphan(path, _size(path)))
        running_exports = {path for token, path in self._data_dir.export_journals()
                           if job_alive(token)}
        for path in self._data_dir.tmp_dir.iterdir():
            match = _ID_PREFIX.match(path.name)
            if path in running_exports:
                continue  # the journal of a running export
            if not (match and match.group(1) in busy) and not _export_in_progress(path):
                found.append(Orphan(path, _size(path)))
        listed = {i.id for i in rows if i.status is not ImageStatus.DELETED}
        for path in self._data_dir.blank_overlays_dir.glob("*"):
            if path.name.startswith(".") and job_alive(path.suffix[1:]):
                continue  # being made by a running `servers create`
            match = _ID_PREFIX.match(path.name)
            if not (match and match.group(1) in listed and path.suffix == ".qcow2"):
                found.append(Orphan(path, _size(path)))
        found.extend(self._orphaned_server_dirs())
        return found

    def _orphaned_server_dirs(self) -> list[Orphan]:
        try:
            names = {d.name for d in self._hypervisor().list_domains()}
        except BbsnapError:
            return []  # without libvirt we cannot tell: keep everything
        return [Orphan(path, _size(path)) for path in self._data_dir.servers_dir.iterdir()
                if path.is_dir() and path.name.startswith("srv-") and path.name not in names]

    def fix(self) -> list[Orphan]:
        removed = self.orphans()
        for orphan in removed:
            if orphan.path.is_dir():
                shutil.rmtree(orphan.path, ignore_errors=True)
            else:
                orphan.path.unlink(missing_ok=True)
        return removed


def _traversable_by(path: Path, uid: int, gid: int) -> bool:
    info = path.stat()
    if uid == 0 or info.st_mode & 0o001:
        return True
    if info.st_uid == uid:
        return bool(info.st_mode & 0o100)
    groups = {gid, *os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)}
    return info.st_gid in groups and bool(info.st_mode & 0o010)


def _export_in_progress(path: Path) -> bool:
    """`img-xxxxx.export.PID.qcow2` belongs to a running export while PID lives."""
    parts = path.name.split(".")
    return len(parts) >= 3 and parts[1] == "export" and parts[2].isdigit() and \
        Path(f"/proc/{parts[2]}").exists()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(_size(p) for p in path.iterdir())
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0
