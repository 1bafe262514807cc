"""Servers from catalogue images under the real libvirtd (TCG): identity, seed, lifecycle,
and failures that must leave nothing behind."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import uuid
import xml.etree.ElementTree as ET
from typing import Iterator

import pytest

from bbsnap.state.catalogue import Catalogue
from bbsnap.config import load_settings
from bbsnap.errors import HypervisorError
from bbsnap.hypervisor import DiskSpec, DomainSpec
from bbsnap.state.layout import DataDir
from bbsnap.services.server_create import CreateRequest, ServerCreator
from bbsnap.tinyguest import READY_LINE
from tests.system.conftest import (SMALL, URI, backing_file, console_path, create_server,
                                   nothing_left, wait_for_console_line, wait_until)

def test_server_boots_from_the_image_with_its_own_identity(cloud, hypervisor):
    result = cloud("servers", "create", cloud.image_id, *SMALL, "-n", "web <1> & 'co'")
    assert result.exit_code == 0, result.stderr
    assert "Creating a nano (typ-4nssg) server with image tiny (" + cloud.image_id + ")" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["id", "status", "type", "zone", "created_on", "image_id",
                                "cloud_ips", "name"]
    server_id = lines[2].split()[0]
    assert lines[2].rstrip().endswith("web <1> & 'co'")

    wait_for_console_line(console_path(cloud, server_id), READY_LINE)
    seed_line = wait_for_console_line(console_path(cloud, server_id), "BBSNAP-SEED")
    assert seed_line == f"BBSNAP-SEED instance-id={server_id} hostname=web-1-co"

    shown = json.loads(cloud("servers", "show", server_id, "--format", "json").stdout)
    assert shown["status"] == "active" and shown["image_id"] == cloud.image_id
    assert shown["name"] == "web <1> & 'co'" and shown["accel"] == "tcg"
    assert shown["cloud_ips"] == [f"127.0.0.1:{shown['ssh_port']}"]
    image_file = cloud.data_dir / "images" / f"{cloud.image_id}.qcow2"
    assert backing_file(shown["disks"][0]) == (str(image_file), "qcow2")

    root = ET.fromstring(hypervisor.domain_xml(server_id))
    assert root.findtext("title") == "web <1> & 'co'"
    assert root.findtext("uuid") == root.find("sysinfo/system/entry[@name='uuid']").text
    assert root.findtext("uuid") == shown["uuid"]

    # The image is in use: destroy is refused and names the server.
    refused = cloud("images", "destroy", cloud.image_id)
    assert refused.exit_code == 4 and server_id in refused.stderr

    assert cloud("servers", "destroy", server_id).exit_code == 0
    nothing_left(cloud, hypervisor)
    assert cloud("images", "destroy", cloud.image_id).exit_code == 0


def test_two_servers_from_one_image_differ_and_share_the_image_file(cloud, hypervisor):
    first, second = create_server(cloud, "-i", "2")
    assert first["id"] != second["id"] and first["uuid"] != second["uuid"]
    assert first["macs"] != second["macs"] and first["ssh_port"] != second["ssh_port"]
    assert backing_file(first["disks"][0]) == backing_file(second["disks"][0])
    for server in (first, second):
        line = wait_for_console_line(console_path(cloud, server["id"]), "BBSNAP-SEED")
        assert f"instance-id={server['id']}" in line
    assert cloud("servers", "destroy", first["id"], second["id"]).exit_code == 0
    nothing_left(cloud, hypervisor)


def test_stop_start_and_reboot(cloud, hypervisor):
    (server,) = create_server(cloud)
    console = console_path(cloud, server["id"])
    wait_for_console_line(console, READY_LINE)

    assert cloud("servers", "stop", server["id"]).exit_code == 0
    assert json.loads(cloud("servers", "show", server["id"], "--format", "json").stdout)[
        "status"] == "inactive"
    assert cloud("servers", "stop", server["id"]).exit_code == 4

    assert cloud("servers", "start", server["id"]).exit_code == 0
    wait_for_console_line(console, READY_LINE)
    shown = json.loads(cloud("servers", "show", server["id"], "--format", "json").stdout)
    assert shown["ssh_port"] == server["ssh_port"], "the SSH port is kept across restarts"

    assert cloud("servers", "reboot", server["id"]).exit_code == 0
    wait_until(lambda: console.read_text(errors="replace").count(READY_LINE) >= 2, 240,
               "the guest to boot a second time")
    assert cloud("servers", "stop", "--force", server["id"]).exit_code == 0
    assert cloud("servers", "destroy", server["id"]).exit_code == 0
    nothing_left(cloud, hypervisor)


def test_invalid_user_data_creates_nothing(cloud, hypervisor, work_dir):
    """The kinds of invalid user-data, unknown images, types and the other refusals are
    tests/unit/test_server_create.py (the fake hypervisor); this is the real path once."""
    path = work_dir / "user-data"
    path.write_text("#cloud-config\nusers: [\n")
    result = cloud("servers", "create", cloud.image_id, *SMALL, "--user-data", str(path))
    assert result.exit_code != 0 and "user-data" in result.stderr
    nothing_left(cloud, hypervisor)


def test_user_data_reaches_the_guest(cloud, hypervisor, work_dir):
    path = work_dir / "user-data"
    path.write_text("#cloud-config\nhostname: custom\n")
    (server,) = create_server(cloud, "--user-data", str(path), "--hostname", "given-name")
    line = wait_for_console_line(console_path(cloud, server["id"]), "BBSNAP-SEED")
    assert line.endswith("hostname=given-name")
    assert cloud("servers", "destroy", server["id"]).exit_code == 0


def test_unknown_libvirt_network(cloud, hypervisor):
    result = cloud("servers", "create", cloud.image_id, *SMALL, "--network", "no-such-net")
    assert result.exit_code == 3 and "no-such-net" in result.stderr
    nothing_left(cloud, hypervisor)


@contextlib.contextmanager
def port_in_use() -> Iterator[int]:
    """A 127.0.0.1 port something else listens on, for the duration."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_no_free_port(cloud, hypervisor):
    with port_in_use() as port:
        result = cloud("servers", "create", cloud.image_id, *SMALL,
                       env={"BBSNAP_SSH_PORTS": f"{port}-{port}"})
    assert result.exit_code == 4 and "no free port" in result.stderr
    nothing_left(cloud, hypervisor)


def test_a_domain_that_fails_to_start_leaves_nothing(cloud, hypervisor):
    """The port is taken after it was chosen: QEMU cannot set up the forward and exits."""
    settings = load_settings({"data_dir": str(cloud.data_dir)},
                             environ={"BBSNAP_CONFIG": "", "BBSNAP_ACCEL": "tcg"})
    catalogue = Catalogue(cloud.data_dir / "catalogue.sqlite3")
    try:
        with port_in_use() as busy:
            creator = ServerCreator(catalogue, DataDir(cloud.data_dir).ensure(), hypervisor,
                                    settings, resolve_accel=lambda: "tcg",
                                    choose_ssh_port=lambda _taken: busy)
            with pytest.raises(HypervisorError, match="starting"):
                creator.create(CreateRequest(image_id=cloud.image_id, memory_mib=128))
    finally:
        catalogue.close()
    nothing_left(cloud, hypervisor)


def test_domains_bbsnap_did_not_make_are_listed_but_not_destroyed(cloud, hypervisor, domains,
                                                                   work_dir):
    name = domains.new_name()
    disk = work_dir / "foreign.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    domain_uuid = str(uuid.uuid4())
    hypervisor.define(DomainSpec(
        name=name, uuid=domain_uuid, memory_mib=64, vcpus=1, accel="tcg",
        disks=(DiskSpec(disk),), console_log=work_dir / "c.log", guest_agent=False))

    listed = json.loads(cloud("servers", "list", "--format", "json").stdout)
    assert name in {s["id"] for s in listed}
    shown = json.loads(cloud("servers", "show", domain_uuid, "--format", "json").stdout)
    assert shown["id"] == name and shown["managed"] is False and shown["status"] == "inactive"
    refused = cloud("servers", "destroy", name)
    assert refused.exit_code == 4 and disk.exists()
    assert cloud("servers", "show", "no-such-domain").exit_code == 3


def test_ssh_into_a_server_through_its_127_0_0_1_forward(cloud, hypervisor, work_dir):
    key = work_dir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (server,) = create_server(cloud, "--ssh-key", f"{key}.pub", "--hostname", "reachable")
    wait_for_console_line(console_path(cloud, server["id"]), "BBSNAP-SSH started")

    result = cloud.process("servers", "ssh", server["id"], "-i", str(key), "--",
                           "hostname; cat /run/seed-user-data | head -1", timeout=120)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["reachable", "#cloud-config"]
    stopped = cloud("servers", "stop", "--force", server["id"])
    assert stopped.exit_code == 0
    refused = cloud.process("servers", "ssh", server["id"], "-i", str(key), "--", "true")
    assert refused.exit_code == 4 and "not running" in refused.stderr
    assert cloud("servers", "destroy", server["id"]).exit_code == 0


def test_server_on_a_libvirt_network(cloud, hypervisor, work_dir):
    """Attached to a (test-made, isolated) libvirt network: no port forward, a network NIC.
    Defined only: tests send no traffic to private-range addresses."""
    name = "bbsnap-test-" + uuid.uuid4().hex[:6]
    xml = work_dir / "net.xml"
    xml.write_text(f"<network><name>{name}</name><bridge name='bbt{name[-6:]}'/>"
                   "<ip address='192.168.251.1' netmask='255.255.255.0'/></network>")
    subprocess.run(["virsh", "-q", "-c", URI, "net-create", str(xml)], check=True,
                   capture_output=True)
    try:
        (server,) = create_server(cloud, "--network", name, "--no-start")
        assert server["network"] == name and server["ssh_port"] is None
        root = ET.fromstring(hypervisor.domain_xml(server["id"]))
        interface = root.find("devices/interface")
        assert interface.get("type") == "network"
        assert interface.find("source").get("network") == name
        assert interface.find("mac").get("address") == server["macs"][0]
        assert cloud("servers", "destroy", server["id"]).exit_code == 0
    finally:
        subprocess.run(["virsh", "-q", "-c", URI, "net-destroy", name], check=False,
                       capture_output=True)
