"""An in-memory stand-in for bbsnap's hypervisor port, for fast tests of the services.

It keeps what libvirt keeps for bbsnap: domains (a persistent definition, and while one
runs, the live definition it was started with), their states, checkpoints and one backup
job per domain; it raises bbsnap's errors exactly where, and as, the libvirt adapter does.
tests/contract/test_hypervisor_contract.py runs the same tests against it and against the
real adapter on libvirtd, so what it claims is checked.

Disks are real file paths: a domain starts only when its disk files exist, a running
domain's live disks show the backing file qemu-img reads from the file, and a backup job,
finished when the test says so (``complete_job``), copies each disk with ``qemu-img
convert`` into its target (the whole disk even for an incremental backup: the copy then
holds more than QEMU's would, never less; with ``-n``, into the file bbsnap made, when
libvirt reuses it).

Memory snapshots: a live save pauses the domain at once and writes its running definition
into the save file as JSON (the fake's own save-image format; libvirt's is a header with
the XML, then QEMU's stream), which saved_domain reads back and restore_memory starts from,
with the disks it is told replaced, as libvirt does with a rewritten definition. The save
is synchronous, so ``memory_save_running`` is always false here.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from bbsnap.disks import qemu_img
from bbsnap.errors import (BbsnapError, CheckpointBrokenError, ConflictError, GuestAgentError,
                           GuestAgentSilentError, HypervisorError, NotFoundError,
                           QuiesceError)
from bbsnap.hypervisor import (BackupPlan, CompletedJob, DiskInfo, DiskReplacement, DiskSpec,
                               DomainFacts, DomainInfo, DomainSpec, DomainState, GuestUser,
                               Hardware, HypervisorVersion, JobStatus, NicSpec, PauseCause,
                               SavedDomain, SavedHead)

# What libvirt says, as the adapter passes it on ("<what> failed: <libvirt's message>").
_NOT_RUNNING = "Requested operation is not valid: domain is not running"
_RUNNING = "Requested operation is not valid: domain is already running"
_ACTIVE = "Requested operation is not valid: domain '{}' is already active"
_SAVE_KEY = "bbsnap-fake-save"  # marks the fake's save files


@dataclass
class _Job:
    plan: BackupPlan
    sources: dict[str, DiskInfo]   # device -> the disk it copies
    total: int
    processed: int = 0


@dataclass
class _Domain:
    spec: DomainSpec                          # the persistent definition
    live: DomainSpec | None = None            # the running domain's definition
    state: DomainState = DomainState.SHUTOFF
    persistent: bool = True
    checkpoints: dict[str, str] = field(default_factory=dict)  # name -> device
    broken: set[str] = field(default_factory=set)  # checkpoints whose bitmap is unusable
    frozen: bool = False
    agent_answers: bool = True
    job: _Job | None = None
    completed: CompletedJob | None = None
    addresses: list[str] = field(default_factory=list)
    guest_users: list[GuestUser] = field(default_factory=list)  # what the agent reports
    paused: PauseCause = PauseCause.NOT_PAUSED  # why state is PAUSED


class FakeHypervisor:
    """Implements :class:`bbsnap.hypervisor.Hypervisor` in memory."""

    def __init__(self, *, version: HypervisorVersion | None = None,
                 networks: dict[str, bool] | None = None) -> None:
        self._version = version or HypervisorVersion(libvirt=(9, 0, 0), qemu=(7, 2, 0))
        self.networks = dict(networks or {})   # libvirt network name -> running
        self._domains: dict[str, _Domain] = {}
        self.calls: list[str] = []              # the port's methods called, in order
        # A libvirt that opens save images only as regular files (a confining security
        # driver): restore_memory from a FIFO fails, without reading it.
        self.refuse_fifos = False

    # -- what tests set up or steer ------------------------------------------------------

    def break_checkpoint(self, name: str, checkpoint: str) -> None:
        """The bitmap behind *checkpoint* becomes unusable (QEMU killed before storing it)."""
        self._domain(name).broken.add(checkpoint)

    def silence_agent(self, name: str) -> None:
        """The guest agent stops answering: freeze, thaw and its users fail."""
        self._domain(name).agent_answers = False

    def set_guest_users(self, name: str, users: list[GuestUser]) -> None:
        """Who the guest agent reports logged in (the guest's utmp)."""
        self._domain(name).guest_users = list(users)

    def set_addresses(self, name: str, addresses: list[str]) -> None:
        self._domain(name).addresses = list(addresses)

    def is_frozen(self, name: str) -> bool:
        return self._domain(name).frozen

    def suspend(self, name: str) -> None:
        """A user pauses the running domain (virsh suspend)."""
        dom = self._domain(name)
        if dom.state is not DomainState.SHUTOFF:
            dom.state, dom.paused = DomainState.PAUSED, PauseCause.USER

    def pause_on_io_error(self, name: str) -> None:
        """QEMU stops the running guest on a write its disk refused (the disks' default
        werror=enospc; a copy-before-write into a full backup target fails the guest's
        write too), keeping the write for a retry when it runs again."""
        dom = self._domain(name)
        if dom.state is not DomainState.SHUTOFF:
            dom.state, dom.paused = DomainState.PAUSED, PauseCause.IO_ERROR

    def backup_plan(self, name: str) -> BackupPlan | None:
        """The plan of the backup running on the domain, if one runs."""
        job = self._domain(name).job
        return job.plan if job is not None else None

    def advance_job(self, name: str, processed: int) -> None:
        """The running backup has copied *processed* bytes."""
        job = self._job(name)
        job.processed = min(processed, job.total)

    def complete_job(self, name: str) -> None:
        """The backup job finishes: each disk is copied into its target, into the very file
        bbsnap made when libvirt reuses it (its tables and the blocks reserved past its end
        kept, as QEMU's job writes into it), else into a new one."""
        dom, job = self._domain(name), self._job(name)
        for target in job.plan.targets:
            disk = job.sources[target.device]
            if job.plan.reuse_targets:
                subprocess.run(["qemu-img", "convert", "-n", "-f", disk.format, "-O", "qcow2",
                                disk.path, str(target.path)], check=True, capture_output=True)
            else:
                qemu_img.convert(Path(disk.path), disk.format, target.path, "qcow2")
        dom.job = None
        dom.completed = CompletedJob(known=True, success=True, message="")

    def fail_job(self, name: str, message: str) -> None:
        """The backup job fails (a full target filesystem, ...); libvirt removes the targets."""
        dom, job = self._domain(name), self._job(name)
        _remove_targets(job.plan)
        dom.job = None
        dom.completed = CompletedJob(known=True, success=False, message=message)

    # -- the port --------------------------------------------------------------------------

    def version(self) -> HypervisorVersion:
        self.calls.append("version")
        return self._version

    def define(self, spec: DomainSpec) -> DomainInfo:
        self.calls.append("define")
        for other_name, other in self._domains.items():
            if other.spec.uuid == spec.uuid and other_name != spec.name:
                raise HypervisorError(f"defining the domain failed: operation failed: domain "
                                      f"'{other_name}' already exists with uuid {spec.uuid}")
            if other_name == spec.name and other.spec.uuid != spec.uuid:
                raise HypervisorError(f"defining the domain failed: operation failed: domain "
                                      f"'{spec.name}' already exists with uuid "
                                      f"{other.spec.uuid}")
        existing = self._domains.get(spec.name)
        if existing is None:
            self._domains[spec.name] = _Domain(spec=spec)
        else:
            existing.spec, existing.persistent = spec, True  # the live one runs on unchanged
        return self._describe(spec.name)

    def start(self, name: str) -> DomainInfo:
        self.calls.append("start")
        dom = self._domain(name)
        if dom.state is not DomainState.SHUTOFF:
            raise HypervisorError(f"starting {name} failed: {_RUNNING}")
        missing = [d.path for d in dom.spec.disks if not Path(d.path).exists()]
        if missing:
            raise HypervisorError(f"starting {name} failed: Cannot access storage file "
                                  f"'{missing[0]}': No such file or directory")
        dom.live, dom.state = dom.spec, DomainState.RUNNING
        return self._describe(dom.spec.name)

    def info(self, name: str) -> DomainInfo:
        self.calls.append("info")
        return self._describe(self._domain(name).spec.name)

    def list_domains(self) -> list[DomainInfo]:
        self.calls.append("list_domains")
        return [self._describe(name) for name in self._domains]

    def destroy(self, name: str, *, discarding: bool = False) -> None:
        self.calls.append("destroy")
        dom = self._domain(name)
        if dom.state is DomainState.SHUTOFF:
            return
        if dom.job is not None:
            _remove_targets(dom.job.plan)
            dom.job = None
        dom.state, dom.live, dom.frozen, dom.completed = DomainState.SHUTOFF, None, False, None
        dom.paused = PauseCause.NOT_PAUSED
        if not dom.persistent:
            del self._domains[dom.spec.name]

    def undefine(self, name: str) -> None:
        self.calls.append("undefine")
        dom = self._domain(name)
        dom.checkpoints.clear()
        if dom.state is DomainState.SHUTOFF:
            del self._domains[dom.spec.name]
        else:
            dom.persistent = False  # as libvirt: it runs on, transient, until it stops

    def facts(self, name: str, *, inactive: bool = False) -> DomainFacts:
        self.calls.append("facts")
        dom = self._domain(name)
        spec = dom.spec if inactive or dom.live is None else dom.live
        return _facts(spec, live=not inactive and dom.live is not None)

    def replace_disks(self, name: str, replacements: Sequence[DiskReplacement], *,
                      metadata: dict[str, str] | None = None) -> None:
        self.calls.append("replace_disks")
        dom = self._domain(name)
        disks = list(dom.spec.disks)
        for new in replacements:
            index = next((i for i, d in enumerate(disks) if d.target == new.target), None)
            if index is None:
                raise NotFoundError(f"server {name} has no disk {new.target}")
            disks[index] = replace(disks[index], path=Path(new.path), format=new.format)
        dom.spec = replace(dom.spec, disks=tuple(disks),
                           metadata=dict(metadata) if metadata is not None else dom.spec.metadata)

    def set_metadata(self, name: str, metadata: dict[str, str]) -> None:
        self.calls.append("set_metadata")
        dom = self._domain(name)
        dom.spec = replace(dom.spec, metadata=dict(metadata))

    def shutdown(self, name: str) -> None:
        """The fake's guests obey ACPI at once."""
        self.calls.append("shutdown")
        dom = self._domain(name)
        if dom.state is DomainState.SHUTOFF:
            raise HypervisorError(f"shutting down {name} failed: {_NOT_RUNNING}")
        self.destroy(name)

    def reboot(self, name: str) -> None:
        self.calls.append("reboot")
        if self._domain(name).state is DomainState.SHUTOFF:
            raise HypervisorError(f"rebooting {name} failed: {_NOT_RUNNING}")

    def addresses(self, name: str) -> list[str]:
        self.calls.append("addresses")
        dom = self._domain(name)
        return list(dom.addresses) if dom.state is not DomainState.SHUTOFF else []

    def check_network(self, name: str) -> None:
        self.calls.append("check_network")
        if name not in self.networks:
            raise NotFoundError(f"libvirt network '{name}' not found",
                                hint="'virsh net-list --all' lists them; or use --network user")
        if not self.networks[name]:
            raise ConflictError(f"libvirt network '{name}' is not running",
                                hint=f"virsh net-start {name}")

    def disks(self, name: str) -> list[DiskInfo]:
        self.calls.append("disks")
        return list(self.facts(name).file_disks)

    def freeze(self, name: str, timeout: int) -> int:
        self.calls.append("freeze")
        dom = self._agent(name, "could not freeze its filesystems", silent=GuestAgentSilentError)
        dom.frozen = True
        return 1

    def thaw(self, name: str, timeout: int = 5) -> None:
        self.calls.append("thaw")
        self._agent(name, "could not thaw").frozen = False

    def logged_in_users(self, name: str, timeout: int) -> list[GuestUser]:
        self.calls.append("logged_in_users")
        dom = self._agent(name, "did not say who is logged in", GuestAgentError)
        return list(dom.guest_users)

    def disk_capacity(self, name: str, target: str) -> int:
        self.calls.append("disk_capacity")
        disks = {d.target: d for d in self.facts(name).file_disks}
        if target not in disks:
            raise HypervisorError(f"reading the size of {name}'s {target} failed: invalid "
                                  f"argument: invalid path {target} not assigned to domain")
        disk = disks[target]
        return qemu_img.info(Path(disk.path), disk.format, force_share=True).virtual_size

    def begin_backup(self, name: str, plan: BackupPlan) -> None:
        self.calls.append("begin_backup")
        dom = self._domain(name)
        what = f"starting the backup of {name}"
        if dom.state is DomainState.SHUTOFF or dom.live is None:
            raise HypervisorError(f"{what} failed: {_NOT_RUNNING}")
        if dom.job is not None:
            raise HypervisorError(f"{what} failed: Timed out during operation: cannot acquire "
                                  "state change lock (held by backup job)")
        if plan.incremental_from is not None:
            if plan.incremental_from in dom.broken:
                raise CheckpointBrokenError(f"checkpoint inconsistent: bitmap "
                                            f"'{plan.incremental_from}' is inconsistent")
            if plan.incremental_from not in dom.checkpoints:
                raise HypervisorError(f"{what} failed: Domain checkpoint not found: no domain "
                                      f"checkpoint with matching name "
                                      f"'{plan.incremental_from}'")
        for made in _made_checkpoint(plan):
            if made[0] in dom.checkpoints:
                raise HypervisorError(f"{what} failed: operation failed: domain checkpoint "
                                      f"'{made[0]}' already exists")
        live = {d.target: d for d in _facts(dom.live, live=True).file_disks}
        unknown = [t.device for t in plan.targets if t.device not in live]
        if unknown:
            raise HypervisorError(f"{what} failed: invalid argument: no disk named "
                                  f"'{unknown[0]}'")
        missing = [t.path for t in plan.targets if plan.reuse_targets and not t.path.exists()]
        if missing:  # libvirt opens a reused target as it is
            raise HypervisorError(f"{what} failed: Cannot access storage file "
                                  f"'{missing[0]}': No such file or directory")
        sources = {t.device: live[t.device] for t in plan.targets}
        total = sum(qemu_img.info(Path(d.path), d.format, force_share=True).virtual_size
                    for d in sources.values())
        dom.job, dom.completed = _Job(plan, sources, total), None
        for made in _made_checkpoint(plan):  # at the backup's instant, as libvirt does
            dom.checkpoints[made[0]] = made[1]

    def redefine_checkpoint(self, name: str, checkpoint: str, device: str) -> None:
        self.calls.append("redefine_checkpoint")
        self._domain(name).checkpoints[checkpoint] = device

    def has_checkpoint(self, name: str, checkpoint: str) -> bool:
        self.calls.append("has_checkpoint")
        return checkpoint in self._domain(name).checkpoints

    def delete_checkpoint(self, name: str, checkpoint: str) -> None:
        self.calls.append("delete_checkpoint")
        dom = self._domain(name)
        dom.checkpoints.pop(checkpoint, None)
        dom.broken.discard(checkpoint)

    def checkpoints(self, name: str) -> list[str]:
        self.calls.append("checkpoints")
        return sorted(self._domain(name).checkpoints)

    def job_status(self, name: str) -> JobStatus:
        self.calls.append("job_status")
        job = self._domain(name).job
        if job is None:
            return JobStatus(active=False, processed=0, total=0)
        return JobStatus(active=True, processed=job.processed, total=job.total)

    def completed_job(self, name: str) -> CompletedJob:
        self.calls.append("completed_job")
        dom = self._domain(name)
        if dom.state is DomainState.SHUTOFF:
            return CompletedJob(known=False, success=False,
                                message=f"server {name} stopped during the copy")
        if dom.completed is None:
            return CompletedJob(known=False, success=False,
                                message="libvirt lost track of the copy (was libvirtd "
                                        "restarted while it ran?)")
        return dom.completed

    def abort_job(self, name: str) -> None:
        self.calls.append("abort_job")
        dom = self._domain(name)
        if dom.job is not None:
            self.fail_job(name, "operation aborted: job 'backup' canceled by client")

    # -- memory snapshots --------------------------------------------------------------------

    def hardware(self, name: str, *, migratable: bool = False) -> Hardware:
        """The fake adds no implicit devices: both forms are the same."""
        self.calls.append("hardware")
        return _hardware(self._domain(name).spec)

    def save_memory_live(self, name: str, path: Path, manual_disks: list[str],
                         skipped_disks: list[str], max_downtime_ms: int) -> None:
        """The RAM "copied" at once: the domain is left paused, its definition in *path*."""
        self.calls.append("save_memory_live")
        dom = self._domain(name)
        what = f"saving the memory of {name}"
        if dom.live is None or dom.state is DomainState.SHUTOFF:
            raise HypervisorError(f"{what} failed: {_NOT_RUNNING}")
        if dom.job is not None:
            raise HypervisorError(f"{what} failed: Timed out during operation: cannot acquire "
                                  "state change lock (held by backup job)")
        devices = {d.target for d in dom.live.disks}
        unknown = [d for d in [*manual_disks, *skipped_disks] if d not in devices]
        if unknown:
            raise HypervisorError(f"{what} failed: invalid argument: no disk named "
                                  f"'{unknown[0]}'")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({_SAVE_KEY: _spec_to_json(dom.live)}, out)
        dom.state, dom.paused = DomainState.PAUSED, PauseCause.OTHER

    def memory_save_running(self, name: str) -> bool:
        self.calls.append("memory_save_running")
        self._domain(name)
        return False

    def pause_cause(self, name: str) -> PauseCause:
        self.calls.append("pause_cause")
        dom = self._domain(name)
        return dom.paused if dom.state is DomainState.PAUSED else PauseCause.NOT_PAUSED

    def resume(self, name: str) -> None:
        """As libvirt: a paused domain runs again; one that runs already is refused."""
        self.calls.append("resume")
        dom = self._domain(name)
        if dom.state is DomainState.SHUTOFF:
            raise HypervisorError(f"resuming {name} failed: {_NOT_RUNNING}")
        if dom.state is DomainState.RUNNING:
            raise HypervisorError(f"resuming {name} failed: {_RUNNING}")
        dom.state, dom.paused = DomainState.RUNNING, PauseCause.NOT_PAUSED

    def delete_disk_snapshot(self, name: str, disk_path: str, snapshot: str) -> None:
        """Through the domain's "QEMU": only while it runs, on a disk it has open."""
        self.calls.append("delete_disk_snapshot")
        dom = self._domain(name)
        if dom.live is None or dom.state is DomainState.SHUTOFF:
            raise HypervisorError(f"reading the disks of {name} failed: {_NOT_RUNNING}")
        if disk_path not in {str(d.path) for d in dom.live.disks}:
            raise HypervisorError(f"{name} has no disk {disk_path} open")
        if snapshot not in qemu_img.snapshot_names(Path(disk_path)):
            raise HypervisorError(f"deleting snapshot {snapshot} of {disk_path} failed: "
                                  f"Snapshot with name '{snapshot}' does not exist")
        qemu_img.snapshot_delete(Path(disk_path), snapshot)

    def saved_domain(self, path: Path) -> SavedDomain:
        self.calls.append("saved_domain")
        spec = _read_save(path)
        return SavedDomain(name=spec.name, uuid=spec.uuid, hardware=_hardware(spec),
                           disks={d.target: str(d.path) for d in spec.disks})

    def saved_head(self, stream: BinaryIO) -> SavedHead:
        """A fake save file is all header: the whole stream is read."""
        self.calls.append("saved_head")
        data = stream.read()
        spec = _parse_save(data, "reading the memory image failed")
        return SavedHead(data=data, definition=data.decode(), domain=SavedDomain(
            name=spec.name, uuid=spec.uuid, hardware=_hardware(spec),
            disks={d.target: str(d.path) for d in spec.disks}))

    def restore_memory(self, path: Path, disk_sources: dict[str, Path], *,
                       head: SavedHead | None = None) -> DomainInfo:
        """The saved domain running again, its disks in *disk_sources* replaced, with the
        title and metadata of the persistent definition where there is one. *path* is read
        once, whole, as libvirt reads a FIFO (with *head*, it must start with its bytes)."""
        self.calls.append("restore_memory")
        if self.refuse_fifos and stat.S_ISFIFO(os.stat(path).st_mode):
            raise HypervisorError(f"restoring the memory image failed: unable to open {path}: "
                                  "Permission denied")
        saved = _read_save(path)
        disks = tuple(replace(d, path=Path(disk_sources[d.target]))
                      if d.target in disk_sources else d for d in saved.disks)
        live = replace(saved, disks=disks)
        what = "restoring the memory image"
        missing = [d.path for d in disks if not Path(d.path).exists()]
        if missing:
            raise HypervisorError(f"{what} failed: Cannot access storage file "
                                  f"'{missing[0]}': No such file or directory")
        dom = self._domains.get(saved.name)
        if dom is None:  # restored transient, as libvirt does with no definition left
            dom = self._domains[saved.name] = _Domain(spec=live, persistent=False)
        elif dom.state is not DomainState.SHUTOFF:
            raise HypervisorError(f"{what} failed: {_ACTIVE.format(saved.name)}")
        else:
            live = replace(live, title=dom.spec.title, metadata=dict(dom.spec.metadata))
        dom.live, dom.state, dom.paused = live, DomainState.RUNNING, PauseCause.NOT_PAUSED
        return self._describe(saved.name)

    def close(self) -> None:
        self.calls.append("close")

    # -- inside ----------------------------------------------------------------------------

    def _domain(self, key: str) -> _Domain:
        """By name, or by UUID, as the adapter looks domains up."""
        found = self._domains.get(key) or next(
            (d for d in self._domains.values() if d.spec.uuid == key), None)
        if found is None:
            raise NotFoundError(f"server {key} not found",
                                hint="'bbsnap servers list' shows the domains on this connection")
        return found

    def _describe(self, name: str) -> DomainInfo:
        dom = self._domains[name]
        return DomainInfo(name=name, uuid=dom.spec.uuid, state=dom.state,
                          persistent=dom.persistent)

    def _job(self, name: str) -> _Job:
        job = self._domain(name).job
        if job is None:
            raise AssertionError(f"no backup job runs on {name}")
        return job

    def _agent(self, name: str, failed: str,
               error: type[HypervisorError] = QuiesceError,
               silent: type[HypervisorError] | None = None) -> _Domain:
        """The domain, if its guest agent can answer (as *error* says otherwise; a silent
        agent as *silent*, if given)."""
        dom = self._domain(name)
        if dom.state is DomainState.SHUTOFF:
            raise error(f"the guest agent of {name} {failed}: {_NOT_RUNNING}")
        spec = dom.live or dom.spec
        if not spec.guest_agent:
            raise error(f"the guest agent of {name} {failed}: argument unsupported: "
                        "QEMU guest agent is not configured")
        if not dom.agent_answers:
            raise (silent or error)(f"the guest agent of {name} {failed}: Guest agent is "
                                    "not responding: QEMU guest agent is not connected")
        return dom


def running_domain(work_dir: Path, name: str = "srv-aaaaa") -> tuple[FakeHypervisor, DomainSpec]:
    """A fake hypervisor running *name*: 64 MiB, one real 16 MiB qcow2 disk in *work_dir*."""
    import uuid

    disk = work_dir / "disk.qcow2"
    qemu_img.create_blank(disk, 16 << 20)
    hv = FakeHypervisor()
    spec = DomainSpec(name=name, uuid=str(uuid.uuid4()), memory_mib=64, vcpus=1, accel="tcg",
                      disks=(DiskSpec(disk),), console_log=work_dir / "log")
    hv.define(spec)
    hv.start(spec.name)
    return hv, spec


def _facts(spec: DomainSpec, *, live: bool) -> DomainFacts:
    """What the adapter reads back from the definition build_domain_xml makes of *spec*."""
    writable = [d for d in spec.disks if d.device == "disk" and not d.readonly]
    ports = {n.ssh_forward_port for n in spec.nics if n.ssh_forward_port is not None}
    return DomainFacts(
        title=" ".join(spec.title.splitlines()) if spec.title else None,
        # libvirt's <interface>s first, then SLIRP NICs (given on QEMU's command line)
        metadata=dict(spec.metadata), macs=tuple(
            [n.mac for n in spec.nics if n.network or n.passt]
            + [n.mac for n in spec.nics if not (n.network or n.passt)]),
        disks=tuple(str(d.path) for d in writable),
        networks=tuple(n.network for n in spec.nics if n.network),
        memory_mib=spec.memory_mib, vcpus=spec.vcpus, firmware=spec.firmware,
        forwarded_ports=tuple(sorted(p for p in ports if 0 < p <= 65535)),
        console_log=spec.console_log, file_disks=tuple(_disk_info(d, live) for d in spec.disks))


def _disk_info(disk: DiskSpec, live: bool) -> DiskInfo:
    return DiskInfo(target=disk.target, path=str(disk.path), format=disk.format,
                    device=disk.device, readonly=disk.readonly or disk.device == "cdrom",
                    backing=_backing(disk) if live else None)


def _backing(disk: DiskSpec) -> str | None:
    """The first backing file, absolute, as a running domain's live XML shows it."""
    if disk.format != "qcow2" or disk.device != "disk":
        return None
    try:
        found = qemu_img.info(Path(disk.path), "qcow2", force_share=True)
    except BbsnapError:
        return None  # not a qcow2 file (a test's placeholder bytes)
    if not found.backing_file:
        return None
    return str(Path(disk.path).parent / found.backing_file)


def _hardware(spec: DomainSpec) -> Hardware:
    """What the adapter reads of a definition build_domain_xml made (libvirt adds more
    devices of its own; the contract compares hardware only with hardware)."""
    devices = [f"disk {d.target} {d.bus} {d.device}" for d in spec.disks]
    devices += [f"interface {n.model} {n.mac}" for n in spec.nics if n.network or n.passt]
    devices += [f"interface virtio-net-pci,mac={n.mac}" for n in spec.nics
                if not (n.network or n.passt)]
    devices += ["serial pty", "console pty serial", "memballoon none"]
    if spec.guest_agent:
        devices.append("channel unix org.qemu.guest_agent.0")
    return Hardware(machine=spec.machine, cpu="default", memory_kib=spec.memory_mib * 1024,
                    vcpus=spec.vcpus, devices=tuple(sorted(devices)), host_devices=())


def _spec_to_json(spec: DomainSpec) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(spec), default=str))


def _read_save(path: Path) -> DomainSpec:
    """The definition in a fake save file; as the adapter, HypervisorError if it is none."""
    what = f"reading the memory image {path} failed"
    try:
        with Path(path).open("rb") as stream:
            # As QEMU reads a FIFO: up to the end of its stream (here, of the JSON
            # document), not to an end of file that a writer may hold off.
            content = b""
            while chunk := stream.read1(65536):
                content += chunk
                try:
                    json.loads(content)
                    break
                except ValueError:
                    continue
    except FileNotFoundError:
        raise HypervisorError(f"{what}: Failed to open file '{path}': No such file or "
                              "directory") from None
    return _parse_save(content, what)


def _parse_save(content: bytes, what: str) -> DomainSpec:
    try:
        data = json.loads(content)[_SAVE_KEY]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise HypervisorError(f"{what}: operation failed: image magic is incorrect") from None
    return DomainSpec(**{
        **data, "console_log": Path(data["console_log"]),
        "disks": tuple(DiskSpec(**{**d, "path": Path(d["path"])}) for d in data["disks"]),
        "nics": tuple(NicSpec(**n) for n in data["nics"])})


def _made_checkpoint(plan: BackupPlan) -> list[tuple[str, str]]:
    made = plan.new_checkpoint
    return [(made.name, made.device)] if made is not None else []


def _remove_targets(plan: BackupPlan) -> None:
    """What libvirt does when a job fails or is aborted: it removes the targets it made,
    and leaves reused ones (the caller's) in place."""
    if plan.reuse_targets:
        return
    for target in plan.targets:
        target.path.unlink(missing_ok=True)
