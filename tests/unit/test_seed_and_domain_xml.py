import socket
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from bbsnap.errors import ConflictError, InvalidInputError, NotFoundError, UsageError
from bbsnap.hypervisor import (BackupPlan, BackupTarget, DiskSpec, DomainSpec, NewCheckpoint,
                               NicSpec)
from bbsnap.hypervisor.domain_xml import (QEMU_NS, build_backup_xml, build_domain_xml,
                                          build_new_checkpoint_xml, console_log_path,
                                          read_disks, read_domain_facts)
from bbsnap.models import Server, ServerStatus
from bbsnap.netports import choose_port, parse_port_range
from bbsnap.seed import (SeedSpec, check_hostname, default_user_data, hostname_from_name,
                         read_seed_iso, validate_user_data, write_seed_iso)
from bbsnap.server_types import find_type
from bbsnap.services.ssh import ssh_argv


def _spec(**changes) -> DomainSpec:
    base = {"name": "srv-aaaaa", "uuid": "6b3c6f0a-1b9e-4d0c-9a53-6f1d2e3c4b5a",
            "memory_mib": 128, "vcpus": 1, "accel": "tcg",
            "disks": (DiskSpec(Path("/d/disk.qcow2")),), "console_log": Path("/d/console.log")}
    base.update(changes)
    return DomainSpec(**base)


def test_seed_iso_round_trip_and_mode(tmp_path):
    spec = SeedSpec("srv-abcde", "web", ("52:54:00:aa:bb:cc",),
                    default_user_data("web", ["ssh-ed25519 AAAA me@host"], "debian"))
    path = write_seed_iso(spec, tmp_path / "seed.iso")
    assert path.stat().st_mode & 0o777 == 0o600, "user-data may hold secrets"
    files = read_seed_iso(path)
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "srv-abcde",
                                                  "local-hostname": "web"}
    network = yaml.safe_load(files["network-config"])
    assert network["ethernets"]["nic0"]["match"]["macaddress"] == "52:54:00:aa:bb:cc"
    assert network["ethernets"]["nic0"]["dhcp-identifier"] == "mac"
    user = yaml.safe_load(files["user-data"])
    assert files["user-data"].startswith("#cloud-config\n") and "&id" not in files["user-data"]
    assert user["ssh_authorized_keys"] == ["ssh-ed25519 AAAA me@host"]
    assert user["users"][1]["name"] == "debian"
    assert "cloud-init-per" in user["bootcmd"][0], "machine-id is regenerated once per instance"
    assert path.read_bytes()[32769:32774] == b"CD001"
    assert b"cidata" in path.read_bytes()[32768:32900].lower()


@pytest.mark.parametrize("text", ["#cloud-config\nkey: [unclosed\n", "#cloud-config\n- 1\n",
                                  "plain text", ""])
def test_invalid_user_data(text):
    with pytest.raises(InvalidInputError):
        validate_user_data(text)


@pytest.mark.parametrize("text", ["#cloud-config\n", "#cloud-config\npackages: [vim]\n",
                                  "#!/bin/sh\necho hi\n"])
def test_valid_user_data(text):
    assert validate_user_data(text) == text


def test_hostnames():
    assert hostname_from_name("My Web <1> & co", "srv-x") == "my-web-1-co"
    assert hostname_from_name("<<>>", "srv-x") == "srv-x"
    assert check_hostname("a-b1") == "a-b1"
    for bad in ("-a", "A", "a_b", "x" * 64, "a.b"):
        with pytest.raises(UsageError):
            check_hostname(bad)


def test_slirp_nic_goes_on_the_qemu_command_line_with_a_loopback_forward():
    xml = build_domain_xml(_spec(nics=(NicSpec("52:54:00:00:00:01", ssh_forward_port=2345),)))
    root = ET.fromstring(xml)
    args = [a.get("value") for a in root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    assert args[:2] == ["-netdev", "user,id=bbnet0,hostfwd=tcp:127.0.0.1:2345-:22"]
    assert "mac=52:54:00:00:00:01" in args[3] and "addr=0x10" in args[3]
    assert root.find("devices/interface") is None
    assert read_domain_facts(xml).macs == ("52:54:00:00:00:01",)


def test_passt_and_network_nics_are_libvirt_interfaces():
    root = ET.fromstring(build_domain_xml(_spec(nics=(
        NicSpec("52:54:00:00:00:02", passt=True, ssh_forward_port=2400),
        NicSpec("52:54:00:00:00:03", network="default")))))
    passt, network = root.findall("devices/interface")
    assert passt.get("type") == "user" and passt.find("backend").get("type") == "passt"
    forward = passt.find("portForward")
    assert (forward.get("address"), forward.find("range").get("start"),
            forward.find("range").get("to")) == ("127.0.0.1", "2400", "22")
    assert network.get("type") == "network" and network.find("source").get("network") == "default"


def test_virtio_disks_get_an_io_thread_and_ide_cdroms_do_not():
    root = ET.fromstring(build_domain_xml(_spec(disks=(
        DiskSpec(Path("/d/disk.qcow2")),
        DiskSpec(Path("/d/seed.iso"), format="raw", device="cdrom", target="hdc", bus="ide")))))
    assert root.findtext("iothreads") == "1"
    drivers = {d.find("target").get("bus"): d.find("driver") for d in root.findall("devices/disk")}
    assert drivers["virtio"].get("iothread") == "1"
    assert drivers["ide"].get("iothread") is None  # only virtio disks run in an I/O thread


def test_backup_xml_full_and_incremental():
    targets = (BackupTarget("vda", Path("/t/a.qcow2")),)
    full = ET.fromstring(build_backup_xml(BackupPlan(targets, skipped=("hdc",))))
    assert full.find("incremental") is None
    assert full.find("disks/disk[@name='vda']/target").get("file") == "/t/a.qcow2"
    assert full.find("disks/disk[@name='hdc']").get("backup") == "no"
    assert build_new_checkpoint_xml(BackupPlan(targets)) is None
    incremental = ET.fromstring(build_backup_xml(BackupPlan(targets, incremental_from="since")))
    assert incremental.findtext("incremental") == "since"


def test_the_checkpoint_a_backup_makes_leaves_the_other_disks_out():
    plan = BackupPlan((BackupTarget("vda", Path("/t/a.qcow2")), BackupTarget("vdb", Path("/t/b"))),
                      skipped=("hdc",), new_checkpoint=NewCheckpoint("bbsnap-x", "vda", "why"))
    root = ET.fromstring(build_new_checkpoint_xml(plan))
    assert (root.findtext("name"), root.findtext("description")) == ("bbsnap-x", "why")
    disks = {d.get("name"): (d.get("checkpoint"), d.get("bitmap"))
             for d in root.findall("disks/disk")}
    assert disks == {"vda": ("bitmap", "bbsnap-x"), "vdb": ("no", None), "hdc": ("no", None)}


def test_read_disks_reports_the_first_backing_file_of_live_xml():
    xml = """<domain><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='/s/disk.qcow2' index='2'/>
        <backingStore type='file' index='1'><format type='qcow2'/>
          <source file='/i/img.qcow2'/><backingStore/></backingStore>
        <target dev='vda' bus='virtio'/></disk>
      <disk type='file' device='disk'><driver name='qemu' type='raw'/>
        <source file='/s/raw.img'/><backingStore/><target dev='vdb' bus='virtio'/></disk>
    </devices></domain>"""
    first, second = read_disks(xml)
    assert (first.target, first.backing) == ("vda", "/i/img.qcow2")
    assert (second.target, second.backing) == ("vdb", None)


def test_special_characters_are_escaped_and_read_back():
    name = "a <b> & 'c' \"d\"\nline"
    xml = build_domain_xml(_spec(title=name, metadata={"name": name}))
    facts = read_domain_facts(xml)
    assert facts.metadata["name"] == name and facts.title == "a <b> & 'c' \"d\" line"
    assert console_log_path(xml) == Path("/d/console.log")
    assert facts.disks == ("/d/disk.qcow2",) and facts.memory_mib == 128


def test_choose_port_skips_recorded_and_bound_ports():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    busy = holder.getsockname()[1]
    try:
        with pytest.raises(ConflictError):
            choose_port(range(busy, busy + 1), set())
    finally:
        holder.close()
    assert choose_port(range(busy, busy + 1), set()) == busy
    with pytest.raises(ConflictError):
        choose_port(range(busy, busy + 1), {busy})
    assert parse_port_range("2222-2299") == range(2222, 2300)
    for bad in ("22-80", "x", "3000-2000"):
        with pytest.raises(UsageError):
            parse_port_range(bad)


def test_server_types():
    assert find_type("nano").id == "typ-4nssg" and find_type("typ-4nssg").name == "nano"
    with pytest.raises(NotFoundError):
        find_type("huge")


def test_ssh_argv():
    server = Server(id="srv-aaaaa", uuid="u", name="n", status=ServerStatus.ACTIVE, managed=True,
                    ssh_port=2222, username="debian")
    argv = ssh_argv(server, identity="/k", command=["uname", "-a"])
    assert argv[:5] == ["ssh", "-l", "debian", "-p", "2222"]
    assert argv[-4:] == ["--", "127.0.0.1", "uname", "-a"] and "/k" in argv
    with pytest.raises(ConflictError):
        ssh_argv(Server(id="s", uuid="u", name="n", status=ServerStatus.INACTIVE, managed=True))


def test_uefi_domains_ask_libvirt_for_ovmf_and_name_every_disk_in_the_boot_order():
    seed = DiskSpec(Path("/d/seed.iso"), format="raw", device="cdrom", target="hdc", bus="ide")
    root = ET.fromstring(build_domain_xml(_spec(
        firmware="uefi", disks=(DiskSpec(Path("/d/disk.qcow2")), seed))))
    os_el = root.find("os")
    assert os_el.get("firmware") == "efi" and os_el.find("boot") is None
    assert os_el.find("firmware/feature").attrib == {"enabled": "no", "name": "secure-boot"}
    # The seed's CD-ROM is in the order too: OVMF leaves devices outside it unconnected.
    assert [d.find("boot").get("order") for d in root.findall("devices/disk")] == ["1", "2"]
    assert read_domain_facts(ET.tostring(root, encoding="unicode")).firmware == "uefi"

    bios = ET.fromstring(build_domain_xml(_spec()))
    assert bios.find("os").get("firmware") is None and bios.find("os/loader") is None
    assert bios.find("os/boot").get("dev") == "hd" and bios.find("devices/disk/boot") is None


def _with_loader(loader_type: str | None, path: str) -> str:
    root = ET.fromstring(build_domain_xml(_spec()))
    loader = ET.SubElement(root.find("os"), "loader", readonly="yes")
    if loader_type:
        loader.set("type", loader_type)
    loader.text = path
    return ET.tostring(root, encoding="unicode")


@pytest.mark.parametrize("loader_type, path, firmware", [
    ("pflash", "/usr/share/OVMF/OVMF_CODE_4M.fd", "uefi"),    # virt-manager, virt-install
    ("pflash", "/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd", "uefi"),
    ("rom", "/usr/share/qemu/OVMF.fd", "uefi"),                # an OVMF ROM as -bios
    ("rom", "/usr/share/seabios/bios-256k.bin", "bios"),       # another BIOS build
    (None, "/usr/share/qemu/edk2-x86_64-code.fd", "uefi"),
])
def test_the_firmware_of_a_domain_bbsnap_did_not_make(loader_type, path, firmware):
    assert read_domain_facts(_with_loader(loader_type, path)).firmware == firmware
