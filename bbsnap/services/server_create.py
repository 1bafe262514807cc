"""Create servers from catalogue images: linked clones with a new identity.

The disk is a qcow2 overlay on the image (O(1), whatever the image's size); the
identity is new (domain name/id, UUID = SMBIOS UUID, MAC, cloud-init
instance-id, SSH port). Everything is validated before anything is created,
and every step registers its undo, so a failure leaves nothing behind.
"""

from __future__ import annotations

import random
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from bbsnap import host_access, ids
from bbsnap.lazy_dataclass import dataclass
from bbsnap.state import locks
from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.config import Settings
from bbsnap.disks import qemu_img
from bbsnap.errors import InvalidInputError, NotFoundError, UsageError
from bbsnap.hostinfo import default_ssh_public_keys, total_memory_mib
from bbsnap.hypervisor import DiskSpec, DomainSpec, Hypervisor, NicSpec
from bbsnap.state.process_tokens import current_job_token
from bbsnap.state.layout import DataDir
from bbsnap.models import DependentKind, Image, Server, ServerType
from bbsnap.reporting import SILENT, Reporter
from bbsnap.netports import PortRegistry, parse_port_range
from bbsnap.seed import (SeedSpec, check_hostname, default_user_data, hostname_from_name,
                         validate_user_data, write_seed_iso)
from bbsnap.server_types import DEFAULT_TYPE, find_type
from bbsnap.sizes import GIB
from bbsnap.services.snapshots import change_tracking
from bbsnap.services.compensation import Compensation
from bbsnap.services.server_origin import write_origin
from bbsnap.services.server_records import check_server_name, server_from_domain

DISK_FILE = "disk.qcow2"
CREATING_MARKER = ".creating"
SEED_FILE = "seed.iso"
CONSOLE_FILE = "console.log"
# OVMF keeps ~100 MiB more of a small guest's memory than SeaBIOS: the tiny guest's kernel
# and initramfs did not boot under UEFI in 128 MiB. The type's default is raised to this,
# and less is refused.
UEFI_MIN_MEMORY_MIB = 256


@dataclass(frozen=True)
class CreateRequest:
    image_id: str
    name: str | None = None
    server_type: str | None = None
    cpus: int | None = None
    memory_mib: int | None = None
    disk_gib: int | None = None
    user_data: str | None = None          # text of --user-data
    ssh_key_files: tuple[Path, ...] = ()
    hostname: str | None = None
    network: str | None = None            # "user" or a libvirt network; None = settings
    start: bool = True


@dataclass(frozen=True)
class CreatePlan:
    image: Image
    server_type: ServerType
    vcpus: int
    memory_mib: int
    disk_bytes: int
    name: str
    user_data: str | None
    ssh_keys: list[str]
    hostname: str | None
    network: str


class ServerCreator:
    def __init__(self, catalogue: Catalogue, data_dir: DataDir, hypervisor: Hypervisor,
                 settings: Settings, resolve_accel: Callable[[], str],
                 choose_ssh_port: Callable[[set[int]], int] | None = None,
                 port_registry: PortRegistry | None = None,
                 reporter: Reporter = SILENT) -> None:
        """*choose_ssh_port*: pick ports without claiming them (tests forcing a port);
        *port_registry*: where ports are claimed (default: this user's, host-wide)."""
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._reporter = reporter
        self._hv = hypervisor
        self._settings = settings
        self._resolve_accel = resolve_accel
        self._ports = parse_port_range(settings.ssh_ports)
        self._choose_port = choose_ssh_port
        self._port_registry = port_registry

    def plan(self, request: CreateRequest) -> CreatePlan:
        """Check everything the user gave before anything is created."""
        image = self._catalogue.get_available(ids.require(request.image_id, "img"))
        server_type = find_type(request.server_type or DEFAULT_TYPE)
        uefi_floor = UEFI_MIN_MEMORY_MIB if image.firmware == "uefi" else 0
        memory = request.memory_mib or max(server_type.memory_mib, image.min_ram or 0, uefi_floor)
        if memory < uefi_floor:  # it would hang in OVMF or its loader, saying nothing
            raise UsageError(f"--memory {memory} MiB is too little for a UEFI guest",
                             hint=f"give at least {uefi_floor} MiB")
        host_memory = total_memory_mib()
        if memory > host_memory:
            raise UsageError(f"{memory} MiB of memory is more than this host has ({host_memory} MiB)")
        vcpus = request.cpus or server_type.vcpus
        if vcpus < 1 or vcpus > 64:
            raise UsageError(f"{vcpus} vCPUs is out of range (1-64)")
        disk_bytes = (request.disk_gib or server_type.disk_gib) * GIB
        if request.disk_gib is not None and disk_bytes < image.virtual_size:
            raise UsageError(f"--disk-size {request.disk_gib} GiB is smaller than the image "
                             f"({image.virtual_size / GIB:.1f} GiB)")
        disk_bytes = max(disk_bytes, image.virtual_size)
        name = check_server_name(request.name) if request.name is not None else ""
        user_data = validate_user_data(request.user_data) if request.user_data is not None else None
        hostname = check_hostname(request.hostname) if request.hostname else None
        network = request.network or self._settings.network
        if network != "user":
            self._hv.check_network(network)
        return CreatePlan(image, server_type, vcpus, memory, disk_bytes, name, user_data,
                     _read_ssh_keys(request.ssh_key_files), hostname, network)

    def create(self, request: CreateRequest) -> Server:
        plan = self.plan(request)
        accel = self._resolve_accel()
        with self._allocation_lock(), Compensation(self._reporter) as undo:
            in_use = self._identities_in_use()
            server_id = self._new_server_id()
            domain_uuid = str(uuid.uuid4())
            mac = _new_mac(in_use.macs)
            name = plan.name or server_id
            hostname = plan.hostname or hostname_from_name(name, server_id)
            port = (self._claim_port(in_use, domain_uuid, undo) if plan.network == "user"
                    else None)

            directory = self._data_dir.server_dir(server_id)
            self._data_dir.make_dir(directory)  # QEMU's user may enter it, nobody else
            undo.push(f"the directory {directory}", lambda: shutil.rmtree(directory))
            # Crash journal: while this marker names a live process the server is being made;
            # if that process dies first, recovery removes what it left (services/recovery.py).
            marker = directory / CREATING_MARKER
            marker.write_text(f"{current_job_token()} {plan.image.id}\n")
            disk = directory / DISK_FILE
            # Snapshots of the server then copy only what its guest writes.
            change_tracking.new_tracked_overlay(
                self._data_dir, plan.image.id, self._data_dir.image_path(str(plan.image.path)),
                plan.disk_bytes, disk)
            user_data = plan.user_data or default_user_data(hostname, plan.ssh_keys,
                                                            plan.image.username)
            seed = write_seed_iso(SeedSpec(server_id, hostname, (mac,), user_data),
                                  directory / SEED_FILE)
            extra_disks = self._volume_overlays(plan.image, directory)

            self._catalogue.add_dependent(plan.image.id, DependentKind.SERVER, server_id)
            undo.push("the image dependency", lambda: self._catalogue.remove_dependent(
                DependentKind.SERVER, server_id, plan.image.id))

            spec = DomainSpec(
                name=server_id, uuid=domain_uuid, memory_mib=plan.memory_mib,
                vcpus=plan.vcpus, accel=accel, title=name,
                disks=(DiskSpec(disk), *extra_disks,
                       DiskSpec(seed, format="raw", device="cdrom", target="hdc", bus="ide")),
                nics=(NicSpec(mac=mac, network=None if plan.network == "user" else plan.network,
                              ssh_forward_port=port, passt=plan.network == "user" and _has_passt(
                                  self._hv)),),
                console_log=directory / CONSOLE_FILE, firmware=plan.image.firmware,
                console_append=host_access.hands_files_to_qemu(self._settings.connect),
                metadata=_metadata(plan, name, accel, hostname, port))
            # bbsnap's user makes the console log (virtlogd, root, writes into it) and keeps
            # reading the images libvirt hands to QEMU's user (host_access.py).
            spec.console_log.touch(mode=0o600)
            host_access.keep_my_access(sorted(self._data_dir.images_dir.glob("*.qcow2")),
                                       self._settings.connect)
            info = self._hv.define(spec)
            undo.push(f"the definition of {server_id}", lambda: self._hv.undefine(server_id))
            # Which connection and domain own this directory: doctor pointed elsewhere keeps it.
            write_origin(directory, self._settings.connect, info.uuid)
            marker.unlink()  # defined: a server now, whatever happens to its start
            if request.start:
                undo.push(f"the running {server_id}", lambda: _stop_quietly(self._hv, server_id))
                info = self._hv.start(server_id)
            return server_from_domain(self._hv, info)

    def _volume_overlays(self, image: Image, directory: Path) -> list[DiskSpec]:
        """Overlays for the further disks of a multi-disk snapshot image (vdb, vdc, ...)."""
        disks = []
        for index, volume in enumerate(self._catalogue.volumes(image.id), start=1):
            overlay = directory / f"disk{index}.qcow2"
            qemu_img.create_overlay(overlay, self._data_dir.image_path(volume.path))
            disks.append(DiskSpec(overlay, target="vd" + "abcdefghijklmnop"[index]))
        return disks

    @contextmanager
    def _allocation_lock(self) -> Iterator[None]:
        """Serialise id/MAC/port allocation between concurrent bbsnap processes."""
        lock_path = self._data_dir.servers_dir / ".allocate.lock"
        with locks.acquire_path(lock_path, timeout=self._settings.lock_timeout,
                                purpose="servers create", busy="another servers create"):
            yield

    def _identities_in_use(self) -> _InUse:
        """Ports and MACs of every domain on the connection, any data directory's."""
        found = _InUse(set(), set())
        for info in self._hv.list_domains():
            facts = self._hv.facts(info.name)
            server = server_from_domain(self._hv, info, facts=facts)
            if server.ssh_port:
                found.ports.add(server.ssh_port)
            # What the domain forwards, too: its metadata may be missing or damaged.
            found.ports.update(facts.forwarded_ports)
            found.macs.update(m.lower() for m in server.macs)
        return found

    def _claim_port(self, in_use: _InUse, domain_uuid: str, undo: Compensation) -> int:
        """A port for the SSH forward, claimed host-wide (netports.PortRegistry) until the
        domain is gone; a create that fails gives it back."""
        if self._choose_port is not None:
            return self._choose_port(in_use.ports)
        registry = self._port_registry or PortRegistry.for_this_user(
            self._settings.connect, self._settings.lock_timeout)
        port = registry.claim(self._ports, in_use=in_use.ports, live_domains=self._domain_uuids,
                              domain_uuid=domain_uuid, data_dir=str(self._data_dir.root))
        undo.push(f"the claim on port {port}", lambda: registry.release(port, domain_uuid))
        return port

    def _domain_uuids(self) -> set[str]:
        return {info.uuid for info in self._hv.list_domains()}

    def _new_server_id(self) -> str:
        return ids.allocate("srv", self._server_id_free)

    def _server_id_free(self, candidate: str) -> bool:
        try:
            self._hv.info(candidate)
        except NotFoundError:
            return not self._data_dir.server_dir(candidate).exists()
        return False


@dataclass(frozen=True)
class _InUse:
    ports: set[int]
    macs: set[str]


def _metadata(plan: CreatePlan, name: str, accel: str, hostname: str, port: int | None) -> dict[str, str]:
    facts = {"name": name, "image_id": plan.image.id, "type_id": plan.server_type.id,
             "type_name": plan.server_type.name, "created_at": utcnow().isoformat(),
             "owner": plan.image.owner, "accel": accel, "hostname": hostname,
             "network": plan.network, "username": plan.image.username or ""}
    if port is not None:
        facts["ssh_port"] = str(port)
    return facts


def _new_mac(taken: set[str]) -> str:
    """A random locally administered MAC in QEMU's 52:54:00 prefix, unique on this host."""
    rng = random.SystemRandom()
    while True:
        mac = "52:54:00:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(3))
        if mac not in taken:
            return mac


def _read_ssh_keys(files: tuple[Path, ...]) -> list[str]:
    paths = list(files) or default_ssh_public_keys()
    keys = []
    for path in paths:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            raise NotFoundError(f"SSH key file {path} not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"cannot read SSH key file {path}: {exc}") from exc
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not line.startswith(("ssh-", "ecdsa-", "sk-")) or "PRIVATE KEY" in text:
                raise InvalidInputError(f"{path} is not an SSH public key")
            keys.append(line)
    return keys


def _has_passt(hv: Hypervisor) -> bool:
    """libvirt >= 9.2 runs user-mode NICs through passt, with port forwards in its XML."""
    return hv.version().libvirt >= (9, 2, 0) and shutil.which("passt") is not None


def _stop_quietly(hv: Hypervisor, server_id: str) -> None:
    try:
        hv.destroy(server_id)
    except NotFoundError:
        pass
