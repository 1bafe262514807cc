"""`servers create` refusals, on the service with the fake hypervisor: milliseconds, no
libvirtd, no guest. Each refusal is the error (so the exit code) the CLI shows, and leaves
no domain, server directory, image hold or port claim behind.

The real path of each is kept once in tests/system/test_servers.py (an unknown libvirt
network, invalid user-data, no free port, on the real libvirtd).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator

import pytest

from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.config import Settings
from bbsnap.errors import (BbsnapError, ConflictError, InvalidInputError, NotFoundError,
                           UsageError)
from bbsnap.state.layout import DataDir
from bbsnap.models import Image, ImageStatus, ImageType
from bbsnap.netports import PortRegistry
from bbsnap.services.server_create import CreateRequest, ServerCreator
from tests.fakes.hypervisor import FakeHypervisor

IMAGE = "img-tiny0"
URI = "test:///fake"


class World:
    def __init__(self, data: DataDir, catalogue: Catalogue, tmp_path: Path) -> None:
        self.data, self.catalogue = data, catalogue
        self.hv = FakeHypervisor(networks={"lab": True, "stopped": False})
        self.registry = PortRegistry(tmp_path / "registry", URI)
        self.key = tmp_path / "id.pub"
        self.key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG me@host\n")

    def creator(self, ports: str = "40000-40999") -> ServerCreator:
        settings = Settings(data_dir=self.data.root, connect=URI, ssh_ports=ports)
        return ServerCreator(self.catalogue, self.data, self.hv, settings, lambda: "tcg",
                             port_registry=self.registry)

    def create(self, *, ports: str = "40000-40999", **request: object) -> None:
        self.creator(ports).create(CreateRequest(**{  # type: ignore[arg-type]
            "image_id": IMAGE, "ssh_key_files": (self.key,), "start": False, **request}))

    def refused(self, error: type[BbsnapError], match: str, **request: object) -> BbsnapError:
        with pytest.raises(error, match=match) as caught:
            self.create(**request)
        self.assert_nothing_left()
        return caught.value

    def assert_nothing_left(self) -> None:
        assert self.hv.list_domains() == []
        assert "define" not in self.hv.calls
        servers = self.data.servers_dir
        assert not servers.exists() or not any(p.name.startswith("srv-")
                                               for p in servers.iterdir())
        assert self.catalogue.dependents(IMAGE) == []
        assert self.registry.claims() == {}


@pytest.fixture()
def world(data: DataDir, catalogue: Catalogue, tmp_path: Path) -> World:
    catalogue.add(Image(id=IMAGE, type=ImageType.UPLOAD, owner="me", created_at=utcnow(),
                        status=ImageStatus.AVAILABLE, name="tiny", path=f"{IMAGE}.qcow2",
                        virtual_size=128 << 20))
    return World(data, catalogue, tmp_path)


def test_an_unknown_image_is_not_found(world):
    error = world.refused(NotFoundError, "img-zzzzz", image_id="img-zzzzz")
    assert error.exit_code == 3


def test_an_image_that_is_not_available_is_refused(world):
    world.catalogue.update(IMAGE, status=ImageStatus.FAILED)
    error = world.refused(ConflictError, "is failed, not available")
    assert error.exit_code == 4


def test_an_unknown_server_type_is_not_found(world):
    error = world.refused(NotFoundError, "server type 'no-such-type' not found",
                          server_type="no-such-type")
    assert error.hint is not None and "nano" in error.hint


@pytest.mark.parametrize("user_data", ["#cloud-config\nusers: [\n", "#cloud-config\n- a list\n",
                                       "just text\n"])
def test_invalid_user_data_creates_nothing(world, user_data):
    error = world.refused(InvalidInputError, "user-data", user_data=user_data)
    assert error.exit_code != 0 and "\n" not in error.message


def test_a_bad_hostname_is_refused(world):
    error = world.refused(UsageError, "not a valid host name", hostname="evil\n")
    assert error.exit_code == 2


def test_an_unknown_libvirt_network_is_not_found(world):
    error = world.refused(NotFoundError, "libvirt network 'no-such-net' not found",
                          network="no-such-net")
    assert error.exit_code == 3


def test_a_libvirt_network_that_is_not_running_is_refused(world):
    error = world.refused(ConflictError, "'stopped' is not running", network="stopped")
    assert error.hint == "virsh net-start stopped"


def test_more_memory_than_the_host_has(world):
    error = world.refused(UsageError, "more than this host has", memory_mib=64 * 1024 * 1024)
    assert error.exit_code == 2


def test_too_little_memory_for_a_uefi_image(world):
    world.catalogue.update(IMAGE, firmware="uefi")
    world.refused(UsageError, "too little for a UEFI guest", memory_mib=128)


def test_vcpus_out_of_range(world):
    world.refused(UsageError, "65 vCPUs is out of range", cpus=65)


def test_a_disk_smaller_than_the_image_is_refused(world):
    world.catalogue.update(IMAGE, virtual_size=3 << 30)
    world.refused(UsageError, "smaller than the image", disk_gib=1)


def test_a_missing_ssh_key_file_is_not_found(world, tmp_path):
    world.refused(NotFoundError, "not found", ssh_key_files=(tmp_path / "nope.pub",))


def test_a_private_key_is_not_taken_for_a_public_one(world, tmp_path):
    private = tmp_path / "id"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxxx\n")
    world.refused(InvalidInputError, "not an SSH public key", ssh_key_files=(private,))


@pytest.fixture()
def port_in_use() -> Iterator[int]:
    """A 127.0.0.1 port something else listens on, for the duration."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_no_free_port(world, port_in_use):
    error = world.refused(ConflictError, "no free port", ports=f"{port_in_use}-{port_in_use}")
    assert error.exit_code == 4


def test_a_port_another_domain_forwards_is_not_free(world, port_in_use):
    """A domain on the connection forwarding the range's only port (its metadata says
    nothing about it): nobody listens there while it is stopped, yet it is taken."""
    from bbsnap.hypervisor import DiskSpec, DomainSpec, NicSpec

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    world.hv.define(DomainSpec(
        name="foreign", uuid="6b3c6f0a-1b9e-4d0c-9a53-000000000001", memory_mib=64, vcpus=1,
        accel="tcg", disks=(DiskSpec(Path("/nowhere.qcow2")),), console_log=Path("/c.log"),
        nics=(NicSpec("52:54:00:00:00:01", ssh_forward_port=free),)))
    with pytest.raises(ConflictError, match="no free port"):
        world.create(ports=f"{free}-{free}")
    assert [d.name for d in world.hv.list_domains()] == ["foreign"]
    assert world.registry.claims() == {}
