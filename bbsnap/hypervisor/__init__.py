"""The hypervisor port: what bbsnap needs from libvirt, in bbsnap's own terms.

``libvirt_adapter`` is the only module that imports ``libvirt``; it returns the
models below, never libvirt objects, so services and tests don't depend on it.
The port speaks models both ways (a DomainSpec in, DomainFacts out, a BackupPlan, a
disk replacement): libvirt's XML stays inside the adapter package (domain_xml.py),
and tests/fakes/hypervisor.py stands in for it in unit tests.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import BinaryIO, Protocol, Sequence

from bbsnap.hypervisor.models import (BackupPlan, BackupTarget, DiskReplacement, DiskSpec,
                                      DomainFacts, DomainSpec, GuestUser, NewCheckpoint, NicSpec)
from bbsnap.lazy_dataclass import dataclass

__all__ = ["BackupPlan", "BackupTarget", "CompletedJob", "DiskInfo", "DiskReplacement", "DiskSpec",
           "DomainFacts", "DomainInfo", "DomainSpec", "DomainState", "GuestUser", "Hypervisor",
           "HypervisorVersion", "JobStatus", "NewCheckpoint", "NicSpec"]


class DomainState(str, enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    OTHER = "other"


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    state: DomainState
    persistent: bool


@dataclass(frozen=True)
class HypervisorVersion:
    libvirt: tuple[int, int, int]
    qemu: tuple[int, int, int]


@dataclass(frozen=True)
class DiskInfo:
    target: str        # guest device name: vda, sda, hdc ...
    path: str          # source file
    format: str        # qcow2, raw ...
    device: str        # disk, cdrom
    readonly: bool
    backing: str | None = None  # the first backing file, where libvirt's live XML shows it

    @property
    def writable(self) -> bool:
        return self.device == "disk" and not self.readonly


@dataclass(frozen=True)
class JobStatus:
    active: bool
    processed: int     # bytes the job has copied (all its disks)
    total: int         # bytes it has to copy: the whole disks, or only the tracked changes

    @property
    def percent(self) -> int | None:
        """How far the job has got; never 100 while it runs (the image is not yet available)."""
        if not self.active or self.total <= 0:
            return None
        return min(99, self.processed * 100 // self.total)


@dataclass(frozen=True)
class CompletedJob:
    known: bool        # libvirt still remembers the last job (lost across a libvirtd restart)
    success: bool
    message: str
    elapsed_seconds: float | None = None  # how long the job ran, as libvirt timed it


class PauseCause(str, enum.Enum):
    """Why a domain is paused, as far as a snapshot's recovery needs to know."""

    NOT_PAUSED = "not-paused"
    USER = "user"        # someone paused it (virsh suspend, bbsnap never does): leave it
    IO_ERROR = "io-error"  # QEMU stopped it on a write error (its disks' werror=enospc default)
    OTHER = "other"      # a memory save left it paused (libvirt reports no reason), or the like


@dataclass(frozen=True)
class Hardware:
    """What a saved memory image needs of the domain it is restored into (domain_xml)."""

    machine: str                  # os/type@machine: pc-i440fx-7.2, q35 ...
    cpu: str                      # the CPU mode and model: host-model, custom:qemu64 ...
    memory_kib: int
    vcpus: int
    devices: tuple[str, ...]      # one line per guest-visible device, sorted
    host_devices: tuple[str, ...]  # <hostdev> and the like: migration (so saving) impossible


@dataclass(frozen=True)
class SavedDomain:
    """A memory image's facts (its header's domain definition)."""

    name: str
    uuid: str
    hardware: Hardware
    disks: dict[str, str]         # guest device -> source file when it was saved


@dataclass(frozen=True)
class SavedHead:
    """The start of a memory image read from a stream (``saved_head``): its header with the
    saved definition. A restore from a stream (a FIFO) is fed ``data`` first, then the rest."""

    data: bytes                   # exactly the bytes read from the stream
    definition: str               # the saved domain XML (with its secure parts)
    domain: SavedDomain


class Hypervisor(Protocol):
    def version(self) -> HypervisorVersion: ...
    def define(self, spec: DomainSpec) -> DomainInfo: ...
    def start(self, name: str) -> DomainInfo: ...
    def info(self, name: str) -> DomainInfo: ...
    def list_domains(self) -> list[DomainInfo]: ...
    # *discarding*: the caller throws QEMU's whole state away after (a memory revert), so
    # QEMU need not close its images in order.
    def destroy(self, name: str, *, discarding: bool = False) -> None: ...
    def undefine(self, name: str) -> None: ...
    # *inactive*: the persistent definition (the next boot's), not the running domain's.
    def facts(self, name: str, *, inactive: bool = False) -> DomainFacts: ...
    # Each disk pointed at its new file and, with *metadata*, bbsnap's facts replaced, all in
    # one new definition (one step: whoever reads it sees every change or none).
    def replace_disks(self, name: str, replacements: Sequence[DiskReplacement], *,
                      metadata: dict[str, str] | None = None) -> None: ...
    def set_metadata(self, name: str, metadata: dict[str, str]) -> None: ...
    def shutdown(self, name: str) -> None: ...
    def reboot(self, name: str) -> None: ...
    def addresses(self, name: str) -> list[str]: ...
    def check_network(self, name: str) -> None: ...
    def disks(self, name: str) -> list[DiskInfo]: ...
    def freeze(self, name: str, timeout: int) -> int: ...
    def thaw(self, name: str, timeout: int = 5) -> None: ...
    # Who is logged in, as the guest agent says, waiting at most *timeout* s for it
    # (GuestAgentError: no agent, a silent one, a stopped domain).
    def logged_in_users(self, name: str, timeout: int) -> list[GuestUser]: ...
    def begin_backup(self, name: str, plan: BackupPlan) -> None: ...
    def disk_capacity(self, name: str, target: str) -> int: ...
    def redefine_checkpoint(self, name: str, checkpoint: str, device: str) -> None: ...
    def has_checkpoint(self, name: str, checkpoint: str) -> bool: ...
    def delete_checkpoint(self, name: str, checkpoint: str) -> None: ...
    def checkpoints(self, name: str) -> list[str]: ...
    def job_status(self, name: str) -> JobStatus: ...
    def completed_job(self, name: str) -> CompletedJob: ...
    def abort_job(self, name: str) -> None: ...
    # Memory snapshots (services/snapshots/memory.py, memory_restore.py).
    def hardware(self, name: str, *, migratable: bool = False) -> Hardware: ...
    def save_memory_live(self, name: str, path: Path, manual_disks: list[str],
                         skipped_disks: list[str], max_downtime_ms: int) -> None: ...
    def memory_save_running(self, name: str) -> bool: ...
    def pause_cause(self, name: str) -> PauseCause: ...
    def resume(self, name: str) -> None: ...
    def delete_disk_snapshot(self, name: str, disk_path: str, snapshot: str) -> None: ...
    def saved_domain(self, path: Path) -> SavedDomain: ...
    def saved_head(self, stream: BinaryIO) -> SavedHead: ...
    def restore_memory(self, path: Path, disk_sources: dict[str, Path], *,
                       head: SavedHead | None = None) -> DomainInfo: ...
    def close(self) -> None: ...
