"""`bbsnap doctor`: check the host and the data directory, and say exactly how to fix things.

Each check returns Findings; a finding that is not ok carries the command or change that
fixes it. `--fix` runs the crash recovery every command runs, checkpoints the catalogue,
and moves what is provably orphaned into a quarantine it empties after a grace period
(services/reclaim.py says what proves it); nothing is deleted on the strength of an empty
catalogue or another libvirt connection. Orphaned raw memory saves in RAM are the one thing
deleted outright (services/ram_reclaim.py: guest memory is never written to disk).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from bbsnap import host_access
from bbsnap.lazy_dataclass import dataclass
from bbsnap.state.catalogue import Catalogue
from bbsnap.config import Settings
from bbsnap.errors import BbsnapError
from bbsnap.hypervisor import Hypervisor
from bbsnap.state.process_tokens import job_alive
from bbsnap.state.layout import DataDir
from bbsnap.services import ram_reclaim, reclaim
from bbsnap.services.ram_reclaim import RamSurvey
from bbsnap.services.reclaim import Batch, Orphan, Survey

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
    granted: list[str] = field(default_factory=list)  # ACL commands run for QEMU's user
    # Orphaned raw memory saves deleted from RAM, not quarantined: guest memory is a secret
    # a quarantine would write onto disk (and a rename cannot leave tmpfs).
    ram_deleted: list[Orphan] = field(default_factory=list)


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
        findings = [*self._connection_checks(), *self._hypervisor_checks(),
                    *self._tool_checks(), self._kvm_check(),
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
        findings.extend(self._ram_findings(self.ram_survey()))
        findings.extend(self._ram_findings(self.ram_survey(qemu=True), copies=True))
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
        from bbsnap import proc

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
        from bbsnap.accel import probe_kvm

        probe = probe_kvm()
        return Finding("KVM", True, ("usable: " if probe.usable else "not usable, TCG will be "
                                     "used: ") + probe.reason, warning=not probe.usable,
                       fix="nothing to do: --accel auto picks tcg; override with --accel or "
                           "BBSNAP_ACCEL=kvm|tcg")

    def _connection_checks(self) -> list[Finding]:
        """Which connection this is and why, and whether this data directory is its."""
        connect = self._settings.connect
        origin = self._settings.connect_origin or "default"
        findings = [Finding("connection", True, f"{connect} ({origin})")]
        recorded = host_access.recorded_connection(self._data_dir.root)
        if recorded is not None and recorded != connect and host_access.is_local_qemu(connect):
            findings.append(Finding(
                "data directory connection", False,
                f"{self._data_dir.root} belongs to {recorded}: its servers are that "
                f"connection's domains and its files were handed to that QEMU",
                fix=f"use -c {recorded} with it, or give {connect} its own --data-dir"))
        return findings

    def _permission_checks(self) -> list[Finding]:
        """QEMU runs as qemu_user under qemu:///system: every directory on the way must let
        it pass. Under qemu:///session QEMU is the user, who owns the data directory."""
        qemu = host_access.qemu_user_for(self._settings.connect, self._settings.qemu_user)
        if qemu is None:
            return [Finding("data directory access", True,
                            f"QEMU runs as you on {self._settings.connect}"
                            if host_access.is_local_qemu(self._settings.connect)
                            else f"nothing to check on {self._settings.connect}")]
        blocked = host_access.blocked_directories(self._data_dir.root, qemu)
        if blocked:
            return [self._blocked_finding(blocked, qemu)]
        # Images are 0600: libvirt's dynamic ownership hands them to QEMU's user on start.
        # What is wrong is an image others can read (copied in by hand, restored from backup).
        exposed = [p for p in self._data_dir.images_dir.glob("*.qcow2")
                   if p.stat().st_mode & 0o007 or (p.stat().st_mode & 0o070
                                                    and not host_access.group_bits_are_mine(p))]
        if exposed:
            return [Finding("image files", False, f"{len(exposed)} image files can be read "
                            f"by other users (e.g. {exposed[0]})",
                            fix=f"chmod go-rwx {self._data_dir.images_dir}/*.qcow2")]
        return [Finding("data directory access", True,
                        f"{self._data_dir.root} is reachable by {qemu.name}")]

    def _blocked_finding(self, blocked: list[Path], qemu: host_access.QemuUser) -> Finding:
        shown = ", ".join(f"{p} ({p.stat().st_mode & 0o777:04o})" for p in blocked)
        detail = (f"{qemu.name} (QEMU on {self._settings.connect}) cannot enter {shown}: "
                  "guests could not open their disks")
        mine = [p for p in blocked if host_access.fixable_by_me(p)]
        commands = "; ".join(" ".join(host_access.grant_command(p, qemu)) for p in blocked)
        if len(mine) == len(blocked):
            fix = f"bbsnap doctor --fix (runs: {commands}; grants {qemu.name} passage only)"
        else:
            fix = (f"as root: {commands} — or choose a --data-dir {qemu.name} can reach "
                   f"(outside your home); never chmod your home open")
        return Finding("data directory access", False, detail, fix=fix)

    def grant_access(self) -> list[str]:
        """--fix: let QEMU's user pass the directories it cannot (ACL, execute only);
        returns the commands run."""
        qemu = host_access.qemu_user_for(self._settings.connect, self._settings.qemu_user)
        if qemu is None:
            return []
        granted = host_access.grant_traversal(
            host_access.blocked_directories(self._data_dir.root, qemu), qemu)
        return [" ".join(host_access.grant_command(p, qemu)) for p in granted]

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

    def _ram_findings(self, found: RamSurvey, *, copies: bool = False) -> list[Finding]:
        """Raw memory saves (or, *copies*, full disk copies) nobody will store, held in RAM
        (tmpfs) until the host reboots."""
        where = found.directory
        what, instead = (("RAM copies", "full copies go to DATA/tmp/") if copies
                         else ("RAM files", "memory snapshots save into DATA/tmp/"))
        if found.refused:
            return [Finding(f"orphaned {what}", True, f"{where} not read: {found.refused}",
                            warning=True, fix=f"bbsnap neither reads nor writes {where} while "
                            f"it is so ({instead}); remove it if it is yours, else ask who "
                            "made it")]
        wasted = sum(o.size for o in found.orphans)
        kind = "disk copies" if copies else "raw memory saves"
        findings = [Finding(
            f"orphaned {what}", not found.orphans,
            f"{len(found.orphans)} {kind} hold {_bytes(wasted)} of RAM in {where}"
            if found.orphans else "none",
            fix="bbsnap doctor --fix (deletes them: guest memory is never moved onto disk)"
            if found.orphans else "")]
        if found.undecidable:
            first = found.undecidable[0]
            total = sum(u.size for u in found.undecidable)
            findings.append(Finding(
                f"undecidable {what}", True,
                f"{len(found.undecidable)} files hold {_bytes(total)} of RAM in {where} and "
                f"are kept: nothing proves them unused (e.g. {first.path.name}: {first.reason})",
                warning=True, fix=f"if no bbsnap job of yours runs, delete them (rm {where}/"
                                  f"{first.path.name} ...); a reboot empties {where} too"))
        return findings

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

    def ram_survey(self, *, qemu: bool = False) -> RamSurvey:
        return ram_reclaim.survey(self._data_dir, self._catalogue, qemu=qemu)

    def fix(self) -> Reclaimed:
        """Let QEMU's user reach the data directory, empty expired quarantine batches, then
        move this run's orphans into a new one and delete the orphaned memory saves in RAM.
        Run crash recovery first: its files are then no longer mistaken for orphans."""
        granted = self.grant_access()
        purged = reclaim.purge(self._data_dir)
        batch, moved = reclaim.quarantine(self._data_dir, self.orphans())
        # Deleted, not quarantined: guest memory must not land on disk (ram_reclaim.py).
        ram_deleted = ram_reclaim.remove(self._data_dir, self.ram_survey().orphans
                                         + self.ram_survey(qemu=True).orphans)
        if self._catalogue is not None:
            self._catalogue.checkpoint()
        return Reclaimed(batch, moved, purged, granted, ram_deleted)


def _marker_token(marker: Path) -> str:
    try:
        return marker.read_text().split()[0]
    except (OSError, IndexError):
        return ""


def _bytes(size: int) -> str:
    return f"{size} bytes ({size / (1024 * 1024):.1f} MiB)"
