"""bbsnap's data model: frozen dataclasses and enums shared by every layer.

Adapters return these, never libvirt or sqlite objects, so services and the CLI
do not depend on how things are stored.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import NamedTuple

# The catalogue's words live in vocabulary.py, so the CLI's --help builds its choices without
# this module's ~25 dataclasses (~20 ms); they are bbsnap's model all the same.
from bbsnap.lazy_dataclass import dataclass
from bbsnap.vocabulary import Consistency as Consistency
from bbsnap.vocabulary import DependentKind as DependentKind
from bbsnap.vocabulary import ImageStatus as ImageStatus
from bbsnap.vocabulary import ImageType as ImageType
from bbsnap.vocabulary import Visibility as Visibility


@dataclass(frozen=True)
class Image:
    id: str
    type: ImageType
    owner: str
    created_at: datetime
    status: ImageStatus
    name: str
    arch: str = "x86_64"
    description: str = ""
    visibility: Visibility = Visibility.PRIVATE
    virtual_size: int = 0          # bytes the guest sees
    disk_size: int = 0             # bytes the file holds on the host
    compatibility_mode: bool = False
    official: bool = False
    ancestor_id: str | None = None  # the image the server was built from (the seed's meaning)
    parent_id: str | None = None    # the image whose file this one is stored on (its backing)
    format: str = "qcow2"
    path: str | None = None        # file name relative to the data directory's images/
    source_server: str | None = None
    consistency: Consistency | None = None
    checksum: str | None = None    # "sha256:<hex>" of the data as it was imported
    firmware: str = "bios"         # "bios" or "uefi": how servers made from it boot
    username: str | None = None    # default login user of the guest
    min_ram: int | None = None     # MiB
    failure_reason: str | None = None
    job: str | None = None         # "<pid>:<start ticks>" of the process creating it
    progress: int | None = None    # percent of a snapshot's copy done, while it runs
    memory_path: str | None = None  # a memory snapshot's saved RAM and device state: a file
                                    # name in images/ (services/snapshots/memory.py)

    @property
    def memory_state(self) -> bool:
        """Whether the image holds the guest's memory (a revert resumes it)."""
        return self.memory_path is not None

    @property
    def display_status(self) -> str:
        """The seed shows available images as private/public."""
        if self.status is ImageStatus.AVAILABLE:
            return str(self.visibility.value)
        return str(self.status.value)


class ImageSummary(NamedTuple):
    """What a listing's table shows of an image (a cloud image library's list view; `show`
    and the data formats get the whole Image). Read straight from the catalogue's columns,
    its values are as stored: a 10k-row table is read ~3x faster than as Images."""

    id: str
    owner: str
    type: str        # an ImageType value
    created_at: str  # ISO 8601, UTC
    status: str      # an ImageStatus value
    visibility: str  # a Visibility value
    virtual_size: int
    arch: str
    name: str

    @property
    def created_on(self) -> str:
        """The UTC date (YYYY-MM-DD) it was created."""
        return self.created_at[:10]

    @property
    def display_status(self) -> str:
        """As Image.display_status: available images show as private/public."""
        return self.visibility if self.status == ImageStatus.AVAILABLE.value else self.status


@dataclass(frozen=True)
class Dependent:
    """Something that needs an image's file to exist."""

    image_id: str
    kind: DependentKind
    dependent_id: str


@dataclass(frozen=True)
class ImageFilter:
    type: ImageType | None = None
    status: str | None = None   # an ImageStatus value or private/public
    include_deleted: bool = False
    source_server: str | None = None  # only the snapshots of this server (its id or name)


@dataclass(frozen=True)
class ServerType:
    """A named preset of vCPUs, RAM and disk, as the seed's "nano (typ-4nssg)"."""

    id: str
    name: str
    vcpus: int
    memory_mib: int
    disk_gib: int


class ServerStatus(str, enum.Enum):
    ACTIVE = "active"        # running
    INACTIVE = "inactive"    # defined, shut off
    PAUSED = "paused"
    CRASHED = "crashed"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Server:
    """A libvirt domain, bbsnap's own (``srv-xxxxx``) or any other on the connection."""

    id: str                        # the libvirt domain name
    uuid: str
    name: str                      # the user's name (bbsnap's) or the domain name
    status: ServerStatus
    managed: bool                  # made by bbsnap (has our metadata)
    image_id: str | None = None
    type_id: str | None = None
    type_name: str | None = None
    created_at: datetime | None = None
    owner: str | None = None
    accel: str | None = None
    hostname: str | None = None
    ssh_port: int | None = None    # 127.0.0.1 forward to the guest's port 22
    network: str | None = None     # libvirt network name, None for user-mode
    macs: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    disks: tuple[str, ...] = ()
    vcpus: int = 0
    memory_mib: int = 0
    username: str | None = None
    firmware: str = "bios"         # "uefi" when the domain boots through OVMF


@dataclass(frozen=True)
class SnapshotDisk:
    """One disk of a snapshot job: where it is copied to and how it is finished."""

    device: str                  # the guest's device name (vda)
    source: str                  # the server's disk file
    source_format: str
    target: str                  # the copy (in the data directory's tmp/)
    ancestor: str | None = None  # store as a delta on this (immutable catalogue) file
    incremental: bool = False    # only clusters written since *ancestor*'s instant are copied
    since: str | None = None     # the checkpoint an incremental copy starts from (None: the
                                 # bitmap the disk was born with, as journals before chains)
    checkpoint: str | None = None  # the checkpoint this snapshot's instant creates


@dataclass(frozen=True)
class SnapshotJob:
    domain: str
    domain_uuid: str
    mode: str                    # "backup" (running: push-mode backup), "memory" (running:
                                 # the RAM saved and the disks' instant kept at one instant,
                                 # services/snapshots/memory.py) or "copy" (shut off)
    disks: tuple[SnapshotDisk, ...]


@dataclass(frozen=True)
class ImageVolume:
    """A further disk of a multi-disk snapshot image (the first disk is the image itself)."""

    device: str
    path: str                    # file name relative to the data directory's images/
    virtual_size: int
    disk_size: int


@dataclass(frozen=True)
class ChainLink:
    """Where a snapshot's checkpoint lives: the next snapshot of the same disk may copy only
    what was written since, if the disk is provably the one the checkpoint was made on."""

    image_id: str
    domain_uuid: str
    checkpoint: str              # libvirt checkpoint (and dirty bitmap) name
    device: str                  # the guest's device name (vda)
    disk_path: str               # the disk file at the snapshot's instant
    disk_identity: str           # "<st_dev>:<st_ino>" of that file: a replaced file differs


@dataclass(frozen=True)
class Schedule:
    """A server's snapshot schedule: every *every_seconds*, then prune by *retention*
    (services/retention.py rules; all 0: no pruning)."""

    server_uuid: str
    server: str
    every_seconds: int
    retention: dict[str, int]
    quiesce: bool
    created_at: datetime
    last_run: datetime | None = None
    last_result: str | None = None
