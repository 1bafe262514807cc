"""What goes into and comes out of the hypervisor port, in bbsnap's terms.

Services describe a domain (DomainSpec), read what any domain holds (DomainFacts) and plan
a backup (BackupPlan) with these; only the adapter package turns them into libvirt XML and
back (domain_xml.py), so no service parses or edits XML.
"""

from __future__ import annotations

from dataclasses import field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bbsnap.lazy_dataclass import dataclass

if TYPE_CHECKING:
    from bbsnap.hypervisor import DiskInfo


@dataclass(frozen=True)
class DiskSpec:
    path: Path
    format: str = "qcow2"
    target: str = "vda"
    bus: str = "virtio"
    device: str = "disk"       # or "cdrom"
    readonly: bool = False


@dataclass(frozen=True)
class NicSpec:
    mac: str
    network: str | None = None          # a libvirt network name; None = user-mode networking
    ssh_forward_port: int | None = None  # user-mode: 127.0.0.1:PORT -> guest port 22
    passt: bool = False                  # user-mode through passt (libvirt >= 9.2) instead of SLIRP
    model: str = "virtio"


@dataclass(frozen=True)
class DomainSpec:
    """A domain bbsnap defines: Hypervisor.define turns it into a definition."""

    name: str
    uuid: str
    memory_mib: int
    vcpus: int
    accel: str                  # "kvm" or "tcg"
    disks: tuple[DiskSpec, ...]
    console_log: Path
    title: str | None = None
    nics: tuple[NicSpec, ...] = ()
    machine: str = "pc"
    firmware: str = "bios"      # "uefi": OVMF chosen by libvirt, with a per-domain NVRAM
    guest_agent: bool = True
    # Keep the console log file across boots (appended to): virtlogd then writes into the
    # file bbsnap made, which stays its user's; without it virtlogd recreates the log as
    # root's 0600 (unreadable by a normal user's `servers console` on qemu:///system).
    console_append: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DomainFacts:
    """What bbsnap reads back from any domain's definition (bbsnap's own or another tool's)."""

    title: str | None
    metadata: dict[str, str]        # bbsnap's facts ({} for domains bbsnap did not make)
    macs: tuple[str, ...]
    disks: tuple[str, ...]          # source files of writable disks (files and block devices)
    networks: tuple[str, ...]       # libvirt networks the NICs attach to
    memory_mib: int
    vcpus: int
    firmware: str = "bios"          # "uefi" when it boots through OVMF/edk2
    forwarded_ports: tuple[int, ...] = ()  # host ports of SLIRP/passt TCP forwards
    console_log: Path | None = None        # where the serial console is logged, if it is
    file_disks: tuple[DiskInfo, ...] = ()  # file-backed disks (all devices), in order


@dataclass(frozen=True)
class DiskReplacement:
    """Disk *target* of a definition pointed at another file (a rebuild's new overlay)."""

    target: str                 # the guest's device name (vda)
    path: Path
    format: str = "qcow2"


@dataclass(frozen=True)
class BackupTarget:
    device: str                 # the guest's device name (vda)
    path: Path                  # the new qcow2 file QEMU copies the disk into


@dataclass(frozen=True)
class NewCheckpoint:
    """A checkpoint the backup creates at its own instant: a new dirty bitmap, also called
    *name*, on *device*; the domain's other disks are left out of it."""

    name: str
    device: str
    description: str


@dataclass(frozen=True)
class BackupPlan:
    """A push-mode backup of several disks at one instant."""

    targets: tuple[BackupTarget, ...]
    skipped: tuple[str, ...] = ()        # devices not copied (read-only ones: the seed CD)
    incremental_from: str | None = None  # a checkpoint: copy only what was written since
    new_checkpoint: NewCheckpoint | None = None
    reuse_targets: bool = False          # the caller made the target files (REUSE_EXTERNAL)


@dataclass(frozen=True)
class GuestUser:
    """A user the guest agent reports logged in (qemu-ga's guest-get-users: one entry per
    user, with the time of their earliest session that is still open)."""

    name: str
    login_time: datetime            # UTC
    domain: str | None = None       # Windows guests' user domain
