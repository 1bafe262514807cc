"""The libvirt adapter: the only importer of ``libvirt`` in bbsnap.

libvirt-python is imported on first use, so commands that never touch the
hypervisor (the catalogue ones, ``--help``) don't pay for it or need libvirtd.

No libvirtError leaves this module: the connection, and every domain, checkpoint and
network it hands out, is a :class:`_Handle` whose every method call goes through one
error mapping (``_mapped``), so a call written without ``_call`` still fails as a bbsnap
error (a libvirtd restart: HypervisorError, which the snapshot worker reconnects on).
``_call`` only names the operation more precisely. Where the adapter turns libvirt's
error codes into other answers itself, it calls ``.raw`` inside ``except libvirtError``.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from bbsnap.errors import (CheckpointBrokenError, ConflictError, GuestAgentError, HypervisorError,
                           GuestAgentSilentError, NotFoundError, QuiesceError)
from bbsnap.hypervisor import (BackupPlan, CompletedJob, DiskInfo, DiskReplacement, DomainFacts,
                               DomainInfo, DomainSpec, DomainState, GuestUser, Hardware,
                               HypervisorVersion, JobStatus, PauseCause, SavedDomain,
                               SavedHead)
from bbsnap.hypervisor.domain_xml import (build_backup_xml, build_checkpoint_xml, build_domain_xml,
                                          build_memory_snapshot_xml, build_new_checkpoint_xml,
                                          copy_descriptive, read_disks, read_domain_facts,
                                          read_hardware, read_saved_domain, replace_disk_source,
                                          replace_disk_sources, set_metadata)

_STATES = {1: DomainState.RUNNING, 3: DomainState.PAUSED, 5: DomainState.SHUTOFF,
           6: DomainState.CRASHED}


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise HypervisorError("libvirt-python is not installed", hint="run scripts/setup") from exc
    return libvirt


def _mapped(what: str, func: Any, *args: Any) -> Any:
    """Call a libvirt function; its error as bbsnap's, its libvirt objects as handles."""
    libvirt = _libvirt()
    try:
        return _wrap(func(*args))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise NotFoundError(f"{what}: no such domain") from exc
        if exc.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
            raise NotFoundError(f"{what}: no such network") from exc
        if exc.get_error_code() == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT:
            raise CheckpointBrokenError(exc.get_error_message()) from exc
        # Everything else, a lost connection ("Cannot recv data") included.
        raise HypervisorError(f"{what} failed: {exc.get_error_message()}") from exc


def _wrap(value: Any) -> Any:
    """*value* with each libvirt object in it (or in a list of them) as a :class:`_Handle`."""
    libvirt = _libvirt()
    if isinstance(value, list):
        return [_wrap(item) for item in value]
    if isinstance(value, libvirt.virDomain):
        return _Handle(value, f"domain {value.name()}")  # name(): no libvirtd round trip
    if isinstance(value, libvirt.virNetwork):
        return _Handle(value, f"network {value.name()}")
    if isinstance(value, libvirt.virDomainCheckpoint):
        return _Handle(value, f"checkpoint {value.getName()} of {value.getDomain().name()}")
    if isinstance(value, libvirt.virDomainSnapshot):
        return _Handle(value, f"snapshot {value.getName()} of {value.getDomain().name()}")
    return value


class _Handle:
    """A libvirt object whose methods fail as bbsnap errors, named "<method> on <label>"
    unless ``_call`` names the operation. ``raw`` is the object itself, for the few places
    that read libvirt's error codes (each inside ``except libvirt.libvirtError``)."""

    __slots__ = ("raw", "_label")

    def __init__(self, raw: Any, label: str) -> None:
        self.raw = raw
        self._label = label

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self.raw, attr)
        return _Method(f"{attr} on {self._label}", value) if callable(value) else value


class _Method:
    """A handle's bound method: called, it goes through ``_mapped``."""

    __slots__ = ("what", "raw")

    def __init__(self, what: str, raw: Any) -> None:
        self.what = what
        self.raw = raw

    def __call__(self, *args: Any) -> Any:
        return _mapped(self.what, self.raw, *args)


def _version_tuple(number: int) -> tuple[int, int, int]:
    return number // 1_000_000, (number // 1000) % 1000, number % 1000


class LibvirtHypervisor:
    """Implements :class:`bbsnap.hypervisor.Hypervisor` over libvirt-python."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: _Handle | None = None
        self._answered = False  # a connection was opened once (close() does not undo that)
        # One connection for every thread (a worker's guest-agent errands, a memory save's
        # watcher): libvirt's open lets go of the GIL, so two first calls could open two.
        self._connecting = threading.Lock()

    @property
    def conn(self) -> Any:
        """The connection (a :class:`_Handle`: typed Any, as libvirt's objects are)."""
        conn = self._conn
        if conn is not None:
            return conn
        with self._connecting:
            if self._conn is None:
                libvirt = _libvirt()
                libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no stderr noise
                try:
                    self._conn = _Handle(libvirt.open(self.uri),
                                         f"the connection to {self.uri}")
                except libvirt.libvirtError as exc:
                    raise HypervisorError(
                        f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}",
                        hint="is libvirtd running? scripts/setup starts it") from exc
                self._answered = True
            return self._conn

    @property
    def connected(self) -> bool:
        """Whether a connection was opened (and so answered), even if closed since (a
        snapshot closes its connection before forking its worker)."""
        return self._answered

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    @staticmethod
    def _call(what: str, func: Any, *args: Any) -> Any:
        """*func* (a handle's method or a libvirt function) with its failure named *what*."""
        return _mapped(what, func.raw if isinstance(func, _Method) else func, *args)

    def _lookup(self, key: str) -> Any:
        """A domain (a handle) by name, or by UUID (any libvirt domain can be named either way)."""
        try:
            return self._call(f"looking up domain {key}", self.conn.lookupByName, key)
        except NotFoundError:
            pass
        if _looks_like_uuid(key):
            try:
                return self.conn.lookupByUUIDString(key)
            except (NotFoundError, HypervisorError):
                pass  # not a UUID libvirt knows (or takes): not found by either name
        raise NotFoundError(f"server {key} not found",
                            hint="'bbsnap servers list' shows the domains on this connection")

    def _describe(self, dom: Any) -> DomainInfo:
        state = dom.state()[0]  # failing as "state on domain <name> failed: ..."
        return DomainInfo(name=dom.name(), uuid=dom.UUIDString(),
                          state=_STATES.get(state, DomainState.OTHER),
                          persistent=bool(dom.isPersistent()))

    def version(self) -> HypervisorVersion:
        return HypervisorVersion(
            libvirt=_version_tuple(self._call("reading the libvirt version", self.conn.getLibVersion)),
            qemu=_version_tuple(self._call("reading the QEMU version", self.conn.getVersion)))

    def define(self, spec: DomainSpec) -> DomainInfo:
        return self._define(build_domain_xml(spec))

    def _define(self, xml: str) -> DomainInfo:
        return self._describe(self._call("defining the domain", self.conn.defineXML, xml))

    def facts(self, name: str, *, inactive: bool = False) -> DomainFacts:
        return read_domain_facts(self.domain_xml(name, inactive=inactive))

    def replace_disks(self, name: str, replacements: Sequence[DiskReplacement], *,
                      metadata: dict[str, str] | None = None) -> None:
        """Point each disk of the persistent definition at its new file, in one definition
        (for a rebuild); libvirt reads the new files' backing chains itself at the next start."""
        xml = self.domain_xml(name, inactive=True)
        for new in replacements:
            try:
                xml = replace_disk_source(xml, new.target, new.path, new.format)
            except ValueError:
                raise NotFoundError(f"server {name} has no disk {new.target}") from None
        if metadata is not None:
            xml = set_metadata(xml, metadata)
        self._define(xml)

    def set_metadata(self, name: str, metadata: dict[str, str]) -> None:
        """Replace bbsnap's facts in the persistent definition."""
        self._define(set_metadata(self.domain_xml(name, inactive=True), metadata))

    def start(self, name: str) -> DomainInfo:
        dom = self._lookup(name)
        self._call(f"starting {name}", dom.create)
        return self._describe(dom)

    def info(self, name: str) -> DomainInfo:
        return self._describe(self._lookup(name))

    def list_domains(self) -> list[DomainInfo]:
        return [self._describe(d) for d in self._call("listing domains", self.conn.listAllDomains, 0)]

    def destroy(self, name: str, *, discarding: bool = False) -> None:
        """Power the domain off at once. On a local libvirt this process ends QEMU itself
        just before libvirt's destroy, which then has nothing left to wait for (qemu_exit:
        ~15 ms against libvirt 9.0's 200 ms); *discarding* (what QEMU holds is thrown away
        after), with SIGKILL, faster than its orderly exit."""
        from bbsnap.hypervisor import qemu_exit  # threading: not for every command's start-up

        dom = self._lookup(name)
        if not dom.isActive():  # through the handle's mapping, as every call on it
            return
        with qemu_exit.ended_first(qemu_exit.pid_file(self.uri, dom.name()), dom.UUIDString(),
                                   kill=discarding):
            try:
                self._call(f"stopping {name}", dom.destroy)
            except HypervisorError:
                if dom.isActive():
                    raise  # else it ended on its own meanwhile: what was asked for

    def undefine(self, name: str) -> None:
        dom = self._lookup(name)
        libvirt = _libvirt()
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                 | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        self._call(f"undefining {name}", dom.undefineFlags, flags)

    def shutdown(self, name: str) -> None:
        """Ask the guest to power off (ACPI power button); returns at once."""
        self._call(f"shutting down {name}", self._lookup(name).shutdown)

    def reboot(self, name: str) -> None:
        self._call(f"rebooting {name}", self._lookup(name).reboot, 0)

    def addresses(self, name: str) -> list[str]:
        """Guest IPv4/IPv6 addresses: from the guest agent, else DHCP leases, else ARP."""
        libvirt = _libvirt()
        dom = self._lookup(name)
        if not dom.isActive():
            return []
        for source in (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
                       libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
                       libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP):
            try:
                found = dom.interfaceAddresses(source, 0) or {}
            except (HypervisorError, NotFoundError):
                continue  # no agent, no libvirt network, ... try the next source
            addresses = [a["addr"] for iface, info in sorted(found.items()) if iface != "lo"
                         for a in (info.get("addrs") or [])
                         if not a["addr"].startswith(("127.", "fe80:", "::1"))]
            if addresses:
                return addresses
        return []

    def check_network(self, name: str) -> None:
        """Refuse a libvirt network that does not exist or is not running."""
        try:
            network = self.conn.networkLookupByName(name)
        except NotFoundError as exc:  # only that: a lost connection is not a missing network
            raise NotFoundError(f"libvirt network '{name}' not found",
                                hint="'virsh net-list --all' lists them; or use --network user") from exc
        if not network.isActive():
            raise ConflictError(f"libvirt network '{name}' is not running",
                                hint=f"virsh net-start {name}")

    def disks(self, name: str) -> list[DiskInfo]:
        return read_disks(self.domain_xml(name))

    def freeze(self, name: str, timeout: int) -> int:
        """Freeze the guest's filesystems through its agent, waiting at most *timeout* s.

        Raises QuiesceError when there is no agent channel (error 74 in libvirt 9) or the
        agent refuses, GuestAgentSilentError when nothing answers on the channel (86: "QEMU
        guest agent is not connected" at once, or "Guest agent not available for now"
        after *timeout*, a hung agent); the caller falls back to a crash-consistent
        snapshot and records that.
        """
        libvirt = _libvirt()
        dom = self._lookup(name).raw  # libvirt's own message goes into the QuiesceError
        try:
            dom.agentSetResponseTimeout(timeout, 0)
            return int(dom.fsFreeze(None, 0))
        except libvirt.libvirtError as exc:
            error = (GuestAgentSilentError
                     if exc.get_error_code() == libvirt.VIR_ERR_AGENT_UNRESPONSIVE
                     else QuiesceError)
            raise error(f"the guest agent of {name} could not freeze its filesystems: "
                        f"{exc.get_error_message()}") from exc

    def thaw(self, name: str, timeout: int = 5) -> None:
        libvirt = _libvirt()
        dom = self._lookup(name).raw  # libvirt's own message goes into the QuiesceError
        try:
            dom.agentSetResponseTimeout(timeout, 0)  # a silent agent must not block us forever
            dom.fsThaw(None, 0)
        except libvirt.libvirtError as exc:
            raise QuiesceError(f"the guest agent of {name} could not thaw: "
                               f"{exc.get_error_message()}") from exc

    def logged_in_users(self, name: str, timeout: int) -> list[GuestUser]:
        """The users the guest agent reports logged in (virDomainGetGuestInfo with
        VIR_DOMAIN_GUEST_INFO_USERS, i.e. qemu-ga's guest-get-users over the guest's utmp).

        libvirt answers at once when no agent is connected; *timeout* bounds a connected
        one that does not answer. The domain's agent timeout is set back to libvirt's default
        afterwards, so this question leaves no shorter timeout behind for other callers."""
        libvirt = _libvirt()
        dom = self._lookup(name).raw  # libvirt's own message goes into the GuestAgentError
        try:
            dom.agentSetResponseTimeout(timeout, 0)
            try:
                found = dom.guestInfo(libvirt.VIR_DOMAIN_GUEST_INFO_USERS, 0) or {}
            finally:
                try:
                    dom.agentSetResponseTimeout(
                        libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT, 0)
                except libvirt.libvirtError:
                    pass  # the domain stopped meanwhile: nothing is left to restore
        except libvirt.libvirtError as exc:
            raise GuestAgentError(f"the guest agent of {name} did not say who is logged in: "
                                  f"{exc.get_error_message()}") from exc
        return _guest_users(found)

    def disk_capacity(self, name: str, target: str) -> int:
        """A disk's virtual size in bytes, as libvirt sees it (the running disk's file may
        belong to QEMU's user, whom the caller cannot read as)."""
        return int(self._call(f"reading the size of {name}'s {target}",
                              self._lookup(name).blockInfo, target)[0])

    def begin_backup(self, name: str, plan: BackupPlan) -> None:
        """Start a push-mode backup; the point in time is fixed when this returns. With a
        new checkpoint in the plan, libvirt creates it at the same instant (atomically: no
        checkpoint without the backup, and no write falls between the two). With the plan's
        *reuse_targets*, the caller made the target files (libvirt then hands them back to
        their owner when the job ends, instead of leaving files it made itself as root's).

        Raises CheckpointBrokenError when an incremental backup's bitmap is unusable
        (inconsistent after QEMU was killed, or missing from the disk)."""
        libvirt = _libvirt()
        flags = libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL if plan.reuse_targets else 0
        self._call(f"starting the backup of {name}", self._lookup(name).backupBegin,
                   build_backup_xml(plan), build_new_checkpoint_xml(plan), flags)

    def redefine_checkpoint(self, name: str, checkpoint: str, device: str) -> None:
        """Tell libvirt about a checkpoint whose bitmap (named *checkpoint*) is already in
        *device*'s image. libvirt 9.0 only creates checkpoints of running domains, but it
        redefines them on inactive ones."""
        xml = build_checkpoint_xml(checkpoint, device, int(time.time()))
        self._call(f"recording checkpoint {checkpoint} of {name}",
                   self._lookup(name).checkpointCreateXML, xml,
                   _libvirt().VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)

    def has_checkpoint(self, name: str, checkpoint: str) -> bool:
        return self._checkpoint(name, checkpoint) is not None

    def delete_checkpoint(self, name: str, checkpoint: str) -> None:
        """Forget a checkpoint: its bitmap too where libvirt can reach it, else the record."""
        found = self._checkpoint(name, checkpoint)
        if found is None:
            return
        libvirt = _libvirt()
        try:
            found.delete(0)
        except HypervisorError:
            # QEMU could not drop the bitmap (the domain stopped, ...): the record at least.
            self._call(f"forgetting checkpoint {checkpoint} of {name}", found.delete,
                       libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)

    def checkpoints(self, name: str) -> list[str]:
        """Names of every checkpoint of the domain, bbsnap's and other tools' alike."""
        found = self._call(f"listing the checkpoints of {name}",
                           self._lookup(name).listAllCheckpoints, 0)
        return sorted(c.getName() for c in found)

    def _checkpoint(self, name: str, checkpoint: str) -> Any:
        """The named checkpoint of a domain, or None."""
        libvirt = _libvirt()
        dom = self._lookup(name).raw  # "no such checkpoint" is an answer here, not an error
        try:
            return _wrap(dom.checkpointLookupByName(checkpoint, 0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                return None
            raise HypervisorError(f"looking up checkpoint {checkpoint} of {name} failed: "
                                  f"{exc.get_error_message()}") from exc

    def job_status(self, name: str) -> JobStatus:
        dom = self._lookup(name)
        if not self._call(f"reading the state of {name}", dom.isActive):
            return JobStatus(active=False, processed=0, total=0)  # no domain, no job
        stats = self._call(f"reading the job of {name}", dom.jobStats, 0)
        libvirt = _libvirt()
        active = stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) not in (
            libvirt.VIR_DOMAIN_JOB_NONE, libvirt.VIR_DOMAIN_JOB_COMPLETED,
            libvirt.VIR_DOMAIN_JOB_FAILED, libvirt.VIR_DOMAIN_JOB_CANCELLED)
        return JobStatus(active=active, processed=int(stats.get("disk_processed", 0)),
                         total=int(stats.get("disk_total", 0)))

    def completed_job(self, name: str) -> CompletedJob:
        libvirt = _libvirt()
        dom = self._lookup(name)
        if not self._call(f"reading the state of {name}", dom.isActive):
            return CompletedJob(known=False, success=False,
                                message=f"server {name} stopped during the copy")
        stats = self._call(f"reading the last job of {name}", dom.jobStats,
                           libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        kind = stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)
        if kind == libvirt.VIR_DOMAIN_JOB_NONE:
            return CompletedJob(known=False, success=False,
                                message="libvirt lost track of the copy (was libvirtd restarted "
                                        "while it ran?)")
        success = kind == libvirt.VIR_DOMAIN_JOB_COMPLETED and bool(stats.get("success", True))
        elapsed = stats.get("time_elapsed")  # milliseconds
        return CompletedJob(known=True, success=success,
                            message=str(stats.get("errmsg", "")) or ("" if success else "the job failed"),
                            elapsed_seconds=elapsed / 1000 if elapsed is not None else None)

    def abort_job(self, name: str) -> None:
        dom = self._lookup(name)  # an unknown domain is NotFoundError, as elsewhere
        try:
            dom.abortJob()
        except (HypervisorError, NotFoundError):
            pass  # no job (any more), or no domain since the lookup: nothing to abort

    # -- memory snapshots ------------------------------------------------------------------
    # Measured on Debian 12 (libvirt 9.0, QEMU 7.2, TCG): see services/snapshots/memory.py.

    def hardware(self, name: str, *, migratable: bool = False) -> Hardware:
        """The machine, CPU, RAM and devices of the domain's persistent definition;
        *migratable*: as libvirt writes a definition into a save image's header, without
        the devices it adds implicitly (pci-root, the USB controller, PS/2 inputs), to
        compare with ``saved_head``'s (``saved_domain`` re-adds them, as the plain one has)."""
        if not migratable:
            return read_hardware(self.domain_xml(name, inactive=True))
        libvirt = _libvirt()
        xml = self._call(f"reading the XML of {name}", self._lookup(name).XMLDesc,
                         libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_MIGRATABLE)
        return read_hardware(str(xml))

    def save_memory_live(self, name: str, path: Path, manual_disks: list[str],
                         skipped_disks: list[str], max_downtime_ms: int) -> None:
        """Save the running guest's RAM and device state into *path* (libvirt's save-image
        format) while it runs; returns with the guest **paused** at the instant the RAM copy
        converged. The caller fixes the disks' instant and resumes it (``resume``)."""
        libvirt = _libvirt()
        dom = self._lookup(name)
        # QEMU keeps migration parameters: a shorter final pass than its 300 ms default.
        self._call(f"limiting the pause of {name}", dom.migrateSetMaxDowntime,
                   max_downtime_ms, 0)
        xml = build_memory_snapshot_xml(f"bbsnap-memory-{int(time.time() * 1000)}", path,
                                        manual_disks, skipped_disks)
        flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
        self._call(f"saving the memory of {name}", dom.snapshotCreateXML, xml, flags)

    def memory_save_running(self, name: str) -> bool:
        """Whether a memory save (a snapshot job) of the domain is still running in libvirtd.
        Measured on libvirt 9.0: asked from another connection during a live save, the job
        query waits behind the save's job (a call made 5 ms into a 137 ms save returned
        132 ms later, with "no job"), so asking is waiting for the save's end, up to
        libvirt's 30 s job wait (then it fails, and resume_unless_user_paused asks again)."""
        libvirt = _libvirt()
        dom = self._lookup(name)
        if not dom.isActive():
            return False
        stats = self._call(f"reading the job of {name}", dom.jobStats, 0)
        kind = stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)
        return bool(kind in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)
                    and stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT)

    def pause_cause(self, name: str) -> PauseCause:
        libvirt = _libvirt()
        state, reason = self._call(f"reading the state of {name}", self._lookup(name).state)
        if state != libvirt.VIR_DOMAIN_PAUSED:
            return PauseCause.NOT_PAUSED
        if reason == libvirt.VIR_DOMAIN_PAUSED_USER:
            return PauseCause.USER
        if reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR:
            return PauseCause.IO_ERROR
        return PauseCause.OTHER

    def resume(self, name: str) -> None:
        self._call(f"resuming {name}", self._lookup(name).resume)

    def delete_disk_snapshot(self, name: str, disk_path: str, snapshot: str) -> None:
        """Delete internal qcow2 snapshot *snapshot* of the running domain's disk file
        *disk_path* through its QEMU (which holds the file: no other process may write it).
        libvirt 9.0 has no API for an internal snapshot it did not make, so this is QMP
        through libvirt-qemu (libvirt marks the domain tainted: custom-monitor)."""
        import json

        import libvirt_qemu

        dom = self._lookup(name)
        blocks = json.loads(self._call(f"reading the disks of {name}",
                                       libvirt_qemu.qemuMonitorCommand, dom.raw,
                                       json.dumps({"execute": "query-block"}), 0))
        node = next((b["inserted"]["node-name"] for b in blocks.get("return", [])
                     if b.get("inserted", {}).get("file") == disk_path), None)
        if node is None:
            raise HypervisorError(f"{name} has no disk {disk_path} open")
        command = {"execute": "blockdev-snapshot-delete-internal-sync",
                   "arguments": {"device": node, "name": snapshot}}
        reply = json.loads(self._call(f"deleting snapshot {snapshot} of {disk_path}",
                                      libvirt_qemu.qemuMonitorCommand, dom.raw,
                                      json.dumps(command), 0))
        if "error" in reply:
            raise HypervisorError(f"deleting snapshot {snapshot} of {disk_path} failed: "
                                  f"{reply['error'].get('desc', reply['error'])}")

    def saved_domain(self, path: Path) -> SavedDomain:
        """The facts of a memory image's domain definition (from its header)."""
        xml = self._call(f"reading the memory image {path}", self.conn.saveImageGetXMLDesc,
                         str(path), _libvirt().VIR_DOMAIN_SAVE_IMAGE_XML_SECURE)
        return read_saved_domain(str(xml))

    def saved_head(self, stream: BinaryIO) -> SavedHead:
        """The header of a memory image at the start of *stream* (hypervisor/save_image.py:
        libvirt reads it only from a file, a FIFO can be read once)."""
        from bbsnap.hypervisor import save_image

        try:
            head = save_image.read_head(stream)
        except save_image.NotASaveImage as exc:
            raise HypervisorError(f"reading the memory image failed: {exc}") from exc
        return SavedHead(data=head.data, definition=head.definition,
                         domain=read_saved_domain(head.definition))

    def restore_memory(self, path: Path, disk_sources: dict[str, Path], *,
                       head: SavedHead | None = None) -> DomainInfo:
        """Start the domain from a memory image, running, with each disk in *disk_sources*
        (device -> file) replaced: the saved definition names the snapshot-time files.
        With *head* (read by ``saved_head``), *path* may be a FIFO fed those bytes and then
        the rest: libvirt opens it once, reads the header and hands the open file to QEMU."""
        libvirt = _libvirt()
        if head is not None:
            saved = head.definition
        else:
            saved = self._call(f"reading the memory image {path}",
                               self.conn.saveImageGetXMLDesc, str(path),
                               libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE)
        xml = replace_disk_sources(str(saved), disk_sources)
        try:
            # The saved definition's title and metadata are the snapshot's; the persistent
            # one's are the server's now (a revert records the image it runs from there).
            current = self.domain_xml(read_saved_domain(xml).name, inactive=True)
            xml = copy_descriptive(current, xml)
        except NotFoundError:
            pass
        self._call("restoring the memory image", self.conn.restoreFlags, str(path), xml,
                   libvirt.VIR_DOMAIN_SAVE_RUNNING)
        return self._describe(self._lookup(read_saved_domain(xml).name))

    def domain_xml(self, name: str, *, inactive: bool = False) -> str:
        """The domain's libvirt XML. Not part of the port (services read facts()); the
        system tests use it to look at what libvirt was given."""
        flags = _libvirt().VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(self._call(f"reading the XML of {name}", self._lookup(name).XMLDesc, flags))


def _guest_users(found: dict[str, Any]) -> list[GuestUser]:
    """libvirt's typed parameters (user.count, user.N.name, user.N.domain, user.N.login-time
    in milliseconds since the epoch) as models; an entry without a name is skipped."""
    users = []
    for index in range(int(found.get("user.count", 0))):
        name = found.get(f"user.{index}.name")
        if not isinstance(name, str) or not name:
            continue
        millis = int(found.get(f"user.{index}.login-time", 0))
        domain = found.get(f"user.{index}.domain")
        users.append(GuestUser(name=name,
                               login_time=datetime.fromtimestamp(millis / 1000, timezone.utc),
                               domain=domain if isinstance(domain, str) and domain else None))
    return users


def _looks_like_uuid(key: str) -> bool:
    import uuid

    try:
        uuid.UUID(key)
    except ValueError:
        return False
    return True
