"""Build libvirt domain XML with ElementTree (never string formatting).

Choices that matter for the guests bbsnap runs (DESIGN §4):
- virtio disks and NICs: Debian's cloud kernel has no AHCI and no e1000;
- on the i440fx ``pc`` machine a seed ISO goes on an IDE CD-ROM;
- the serial console is logged to a file by virtlogd, so tests and
  ``servers console`` can read what the guest printed;
- bbsnap's facts live in a namespaced ``<metadata>`` element.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from bbsnap.hypervisor import DiskInfo, Hardware, SavedDomain
from bbsnap.hypervisor.models import BackupPlan, DiskSpec, DomainFacts, DomainSpec, NicSpec

METADATA_NS = "https://bbsnap.dev/xmlns/server/1"
METADATA_PREFIX = "bbsnap"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


# SLIRP NICs are given on QEMU's command line (libvirt 9.0 has no XML for SLIRP port
# forwards), at fixed PCI slots well above the ones libvirt assigns to its own devices.
_SLIRP_FIRST_PCI_SLOT = 0x10


def build_domain_xml(spec: DomainSpec) -> str:
    domain = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    ET.SubElement(domain, "name").text = spec.name
    ET.SubElement(domain, "uuid").text = spec.uuid
    if spec.title:
        # libvirt refuses newlines in a title; the full name stays in our metadata.
        ET.SubElement(domain, "title").text = " ".join(spec.title.splitlines())
    if spec.metadata:
        _add_metadata(domain, spec.metadata)
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)
    # Virtio disks get their own I/O thread: QEMU then runs their I/O, and a snapshot's
    # backup job, outside its main loop. A bare 1 GiB backup job took 0.7-0.8 s instead of
    # ~1.1 s here; in the whole snapshot flow the difference was within the host's noise.
    if any(d.bus == "virtio" for d in spec.disks):
        ET.SubElement(domain, "iothreads").text = "1"
    sysinfo = ET.SubElement(domain, "sysinfo", type="smbios")
    ET.SubElement(ET.SubElement(sysinfo, "system"), "entry", name="uuid").text = spec.uuid
    os_el = ET.SubElement(domain, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine=spec.machine).text = "hvm"
    uefi = spec.firmware == "uefi"
    if uefi:
        # libvirt picks the OVMF build from QEMU's firmware descriptors and makes the NVRAM
        # store from its template (removed again by undefine's NVRAM flag). Secure boot
        # needs q35 + SMM and enrolled keys; bbsnap's guests boot unsigned loaders.
        os_el.set("firmware", "efi")
        ET.SubElement(ET.SubElement(os_el, "firmware"), "feature", enabled="no",
                      name="secure-boot")
    else:
        ET.SubElement(os_el, "boot", dev="hd")
    ET.SubElement(os_el, "smbios", mode="sysinfo")
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_reboot").text = "restart"
    ET.SubElement(domain, "on_crash").text = "destroy"
    devices = ET.SubElement(domain, "devices")
    for order, disk in enumerate(spec.disks, start=1):
        # OVMF connects only the devices named in the boot order, and a CD-ROM it left
        # unconnected was never found by the guest's kernel (ata_piix saw no drive, so the
        # NoCloud seed went missing). Under UEFI every disk gets a place, the first disk
        # first; under BIOS <os><boot dev='hd'/> keeps SeaBIOS's order.
        _add_disk(devices, disk, boot_order=order if uefi else None)
    slirp_args: list[str] = []
    for index, nic in enumerate(spec.nics):
        if nic.network or nic.passt:
            _add_nic(devices, nic)
        else:
            slirp_args += _slirp_args(index, nic)
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "log", file=str(spec.console_log),
                  append="on" if spec.console_append else "off")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    if spec.guest_agent:
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    ET.SubElement(devices, "memballoon", model="none")
    if slirp_args:
        ET.register_namespace("qemu", QEMU_NS)
        commandline = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
        for arg in slirp_args:
            ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    return ET.tostring(domain, encoding="unicode")


def _slirp_args(index: int, nic: NicSpec) -> list[str]:
    netdev = f"user,id=bbnet{index}"
    if nic.ssh_forward_port is not None:
        netdev += f",hostfwd=tcp:127.0.0.1:{nic.ssh_forward_port}-:22"
    device = (f"virtio-net-pci,netdev=bbnet{index},mac={nic.mac},bus=pci.0,"
              f"addr={_SLIRP_FIRST_PCI_SLOT + index:#x}")
    return ["-netdev", netdev, "-device", device]


def _add_metadata(domain: ET.Element, facts: dict[str, str]) -> None:
    _fill_metadata(ET.SubElement(domain, "metadata"), facts)


def _fill_metadata(metadata: ET.Element, facts: dict[str, str]) -> None:
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    holder = ET.SubElement(metadata, f"{{{METADATA_NS}}}server")
    for key, value in sorted(facts.items()):
        ET.SubElement(holder, f"{{{METADATA_NS}}}{key}").text = value


def _add_disk(devices: ET.Element, disk: DiskSpec, boot_order: int | None = None) -> None:
    element = ET.SubElement(devices, "disk", type="file", device=disk.device)
    driver = ET.SubElement(element, "driver", name="qemu", type=disk.format)
    if disk.bus == "virtio":
        driver.set("iothread", "1")
    ET.SubElement(element, "source", file=str(disk.path))
    ET.SubElement(element, "target", dev=disk.target, bus=disk.bus)
    if boot_order is not None:
        ET.SubElement(element, "boot", order=str(boot_order))
    if disk.readonly or disk.device == "cdrom":
        ET.SubElement(element, "readonly")


def _add_nic(devices: ET.Element, nic: NicSpec) -> None:
    if nic.network:
        element = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(element, "source", network=nic.network)
    else:
        element = ET.SubElement(devices, "interface", type="user")
        ET.SubElement(element, "backend", type="passt")
    ET.SubElement(element, "mac", address=nic.mac)
    ET.SubElement(element, "model", type=nic.model)
    if nic.passt and nic.ssh_forward_port is not None:
        forward = ET.SubElement(element, "portForward", proto="tcp", address="127.0.0.1")
        ET.SubElement(forward, "range", start=str(nic.ssh_forward_port), to="22")


def read_domain_facts(xml: str) -> DomainFacts:
    """What bbsnap shows of any domain. Numbers that do not parse read as 0 (unknown):
    one odd domain on the connection must not break listing the others."""
    root = ET.fromstring(xml)
    macs = [m.get("address", "") for m in root.findall("devices/interface/mac")]
    forwards = [_int(r.get("start")) for r in root.findall("devices/interface/portForward/range")]
    for arg in root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
        value = arg.get("value", "")
        for part in value.split(","):
            if part.startswith("mac="):
                macs.append(part[4:])
            elif part.startswith("hostfwd="):
                forwards.append(_hostfwd_port(part[len("hostfwd="):]))
    disks = []
    for disk in root.findall("devices/disk"):
        source = disk.find("source")
        if (disk.get("device", "disk") != "disk" or disk.find("readonly") is not None
                or source is None):
            continue
        path = source.get("file") or source.get("dev")
        if path:
            disks.append(path)
    networks = [s.get("network", "") for s in root.findall("devices/interface/source")
                if s.get("network")]
    memory = root.find("memory")
    memory_kib = _int(memory.text) if memory is not None else 0
    unit = memory.get("unit", "KiB") if memory is not None else "KiB"
    factor = {"KiB": 1, "k": 1, "MiB": 1024, "M": 1024, "GiB": 1024 * 1024, "G": 1024 * 1024,
              "b": 1 / 1024, "bytes": 1 / 1024}.get(unit, 1)
    vcpu = root.find("vcpu")
    title = root.find("title")
    return DomainFacts(
        title=title.text if title is not None else None,
        metadata=_metadata(root), macs=tuple(macs), disks=tuple(disks),
        networks=tuple(networks), memory_mib=int(memory_kib * factor) // 1024,
        vcpus=_int(vcpu.text) if vcpu is not None else 0, firmware=_firmware(root),
        forwarded_ports=tuple(sorted({p for p in forwards if 0 < p <= 65535})),
        console_log=_console_log(root), file_disks=tuple(_file_disks(root)))


def _int(text: str | None) -> int:
    """A non-negative decimal integer, else 0."""
    text = (text or "").strip()
    return int(text) if text.isascii() and text.isdigit() else 0


def _hostfwd_port(rule: str) -> int:
    """The host port of a QEMU hostfwd rule, ``tcp:127.0.0.1:2222-:22`` (0 if none)."""
    host_side = rule.split("-", 1)[0]
    return _int(host_side.rsplit(":", 1)[-1])


_UEFI_LOADER_WORDS = ("ovmf", "edk2", "efi")


def _firmware(root: ET.Element) -> str:
    """bios or uefi, whichever way the domain asks for it: libvirt's autoselection
    (firmware='efi'), a pflash loader (virt-manager, virt-install --boot uefi), or an
    OVMF/edk2 ROM given as the loader."""
    os_el = root.find("os")
    if os_el is None:
        return "bios"
    if os_el.get("firmware") == "efi":
        return "uefi"
    loader = os_el.find("loader")
    if loader is None:
        return "bios"
    if loader.get("type") == "pflash":
        return "uefi"
    name = Path(loader.text or "").name.lower()
    return "uefi" if any(word in name for word in _UEFI_LOADER_WORDS) else "bios"


def read_metadata(xml: str) -> dict[str, str]:
    """bbsnap's facts from a domain's XML ({} for domains bbsnap did not make)."""
    return _metadata(ET.fromstring(xml))


def _metadata(root: ET.Element) -> dict[str, str]:
    holder = root.find(f"metadata/{{{METADATA_NS}}}server")
    if holder is None:
        return {}
    prefix = f"{{{METADATA_NS}}}"
    return {child.tag[len(prefix):]: child.text or "" for child in holder
            if child.tag.startswith(prefix)}


def read_disks(xml: str) -> list[DiskInfo]:
    """File-backed disks of a domain, in XML order."""
    return _file_disks(ET.fromstring(xml))


def _file_disks(root: ET.Element) -> list[DiskInfo]:
    disks = []
    for disk in root.findall("devices/disk"):
        source, target, driver = disk.find("source"), disk.find("target"), disk.find("driver")
        if source is None or target is None or not source.get("file"):
            continue
        disks.append(DiskInfo(target=target.get("dev", ""), path=source.get("file", ""),
                              format=driver.get("type", "raw") if driver is not None else "raw",
                              device=disk.get("device", "disk"),
                              readonly=disk.find("readonly") is not None,
                              backing=_first_backing_file(disk)))
    return disks


def replace_disk_source(xml: str, target: str, new_path: Path, new_format: str = "qcow2") -> str:
    """The domain XML with disk *target*'s file replaced (for rebuild)."""
    root = ET.fromstring(xml)
    for disk in root.findall("devices/disk"):
        tgt = disk.find("target")
        if tgt is not None and tgt.get("dev") == target:
            source = disk.find("source")
            if source is None:
                source = ET.SubElement(disk, "source")
            source.attrib.clear()
            source.set("file", str(new_path))
            driver = disk.find("driver")
            if driver is not None:
                driver.set("type", new_format)
            backing = disk.find("backingStore")
            if backing is not None:
                disk.remove(backing)
            return ET.tostring(root, encoding="unicode")
    raise ValueError(f"no disk {target} in the domain")


def set_metadata(xml: str, facts: dict[str, str]) -> str:
    """The domain XML with bbsnap's metadata replaced by *facts*."""
    root = ET.fromstring(xml)
    metadata = root.find("metadata")
    if metadata is not None:
        for old in metadata.findall(f"{{{METADATA_NS}}}server"):
            metadata.remove(old)
    else:
        metadata = ET.SubElement(root, "metadata")
    _fill_metadata(metadata, facts)
    return ET.tostring(root, encoding="unicode")


def _first_backing_file(disk: ET.Element) -> str | None:
    source = disk.find("backingStore/source")
    return source.get("file") if source is not None else None


def build_backup_xml(plan: BackupPlan) -> str:
    """A push-mode backup of the plan's target disks (each into a new qcow2 file), all at one
    instant; incremental from a checkpoint, only the clusters written since it."""
    backup = ET.Element("domainbackup", mode="push")
    if plan.incremental_from:
        ET.SubElement(backup, "incremental").text = plan.incremental_from
    disks = ET.SubElement(backup, "disks")
    for target in plan.targets:
        disk = ET.SubElement(disks, "disk", name=target.device, backup="yes", type="file")
        ET.SubElement(disk, "target", file=str(target.path))
        ET.SubElement(disk, "driver", type="qcow2")
    for device in plan.skipped:
        ET.SubElement(disks, "disk", name=device, backup="no")
    return ET.tostring(backup, encoding="unicode")


def build_checkpoint_xml(name: str, device: str, created: int) -> str:
    """A checkpoint of *device* whose dirty bitmap, also called *name*, is in its image."""
    checkpoint = ET.Element("domaincheckpoint")
    ET.SubElement(checkpoint, "name").text = name
    ET.SubElement(checkpoint, "creationTime").text = str(created)
    disks = ET.SubElement(checkpoint, "disks")
    ET.SubElement(disks, "disk", name=device, checkpoint="bitmap", bitmap=name)
    return ET.tostring(checkpoint, encoding="unicode")


def build_new_checkpoint_xml(plan: BackupPlan) -> str | None:
    """The checkpoint the plan's backup creates (None if it creates none): a new dirty
    bitmap on one device; the backup's other disks are left out of it."""
    made = plan.new_checkpoint
    if made is None:
        return None
    checkpoint = ET.Element("domaincheckpoint")
    ET.SubElement(checkpoint, "name").text = made.name
    ET.SubElement(checkpoint, "description").text = made.description
    disks = ET.SubElement(checkpoint, "disks")
    ET.SubElement(disks, "disk", name=made.device, checkpoint="bitmap", bitmap=made.name)
    others = [t.device for t in plan.targets if t.device != made.device] + list(plan.skipped)
    for other in others:
        ET.SubElement(disks, "disk", name=other, checkpoint="no")
    return ET.tostring(checkpoint, encoding="unicode")


def console_log_path(xml: str) -> Path | None:
    """Where the serial console is logged, if it is."""
    return _console_log(ET.fromstring(xml))


def _console_log(root: ET.Element) -> Path | None:
    log = root.find("devices/serial/log")
    if log is not None and log.get("file"):
        return Path(log.get("file", ""))
    source = root.find("devices/serial[@type='file']/source")
    if source is not None and source.get("path"):
        return Path(source.get("path", ""))
    return None


# -- memory snapshots ------------------------------------------------------------------------

def build_memory_snapshot_xml(name: str, memory_file: Path, manual: list[str],
                              skipped: list[str]) -> str:
    """A snapshot of the guest's memory alone into *memory_file*. Disks in *manual* are
    libvirt's ``snapshot='manual'``: libvirt leaves the domain paused once the RAM is saved,
    so the caller fixes their instant itself (the push backup) before resuming it."""
    snapshot = ET.Element("domainsnapshot")
    ET.SubElement(snapshot, "name").text = name
    ET.SubElement(snapshot, "memory", snapshot="external", file=str(memory_file))
    disks = ET.SubElement(snapshot, "disks")
    for device in manual:
        ET.SubElement(disks, "disk", name=device, snapshot="manual")
    for device in skipped:
        ET.SubElement(disks, "disk", name=device, snapshot="no")
    return ET.tostring(snapshot, encoding="unicode")


# Devices whose presence and kind a saved memory image depends on (QEMU's migration stream
# carries their state); sources (disk files, log files) and runtime names (aliases) do not.
_DEVICE_TAGS = ("disk", "controller", "interface", "serial", "console", "channel", "input",
                "video", "sound", "watchdog", "memballoon", "rng", "tpm", "filesystem",
                "shmem", "iommu", "vsock", "panic", "smartcard", "redirdev", "graphics")
_HOST_DEVICE_TAGS = ("hostdev",)


def read_hardware(xml: str) -> "Hardware":
    """The machine a memory image was saved on, or a definition it would be restored into."""
    from bbsnap.hypervisor import Hardware

    root = ET.fromstring(xml)
    os_type = root.find("os/type")
    cpu = root.find("cpu")
    if cpu is None:
        cpu_text = "default"
    else:
        model = cpu.find("model")
        cpu_text = cpu.get("mode", "custom")
        if model is not None and model.text and cpu_text == "custom":
            cpu_text = f"custom:{model.text}"
    memory = root.find("memory")
    vcpu = root.find("vcpu")
    devices = root.find("devices")
    found: list[str] = []
    host: list[str] = []
    for element in (list(devices) if devices is not None else []):
        if element.tag in _HOST_DEVICE_TAGS:
            host.append(_describe_device(element))
        elif element.tag in _DEVICE_TAGS:
            found.append(_describe_device(element))
    for arg in root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
        value = arg.get("value", "")
        if value.startswith(("virtio-net", "e1000", "rtl8139")):  # SLIRP NICs (Debian 12)
            found.append("interface " + ",".join(p for p in value.split(",")
                                                 if p.split("=")[0] in ("mac", "addr") or
                                                 "=" not in p))
    return Hardware(
        machine=os_type.get("machine", "") if os_type is not None else "",
        cpu=cpu_text, memory_kib=_kib(memory), vcpus=_int(vcpu.text) if vcpu is not None else 0,
        devices=tuple(sorted(found)), host_devices=tuple(sorted(host)))


def _kib(memory: ET.Element | None) -> int:
    if memory is None:
        return 0
    factor = {"KiB": 1, "k": 1, "MiB": 1024, "M": 1024, "GiB": 1024 * 1024,
              "G": 1024 * 1024}.get(memory.get("unit", "KiB"), 1)
    return _int(memory.text) * factor


def _describe_device(element: ET.Element) -> str:
    """``disk vda virtio disk``, ``interface virtio 52:54:00:..``: what a restore needs the same."""
    parts = [element.tag]
    if element.tag == "disk":
        target = element.find("target")
        parts += [target.get("dev", "") if target is not None else "",
                  target.get("bus", "") if target is not None else "",
                  element.get("device", "disk")]
    elif element.tag == "interface":
        model = element.find("model")
        mac = element.find("mac")
        parts += [model.get("type", "") if model is not None else "",
                  mac.get("address", "") if mac is not None else ""]
    elif element.tag == "controller":
        parts += [element.get("type", ""), element.get("index", ""), element.get("model", "")]
    else:
        parts += [element.get("type", "") or element.get("model", "")]
        target = element.find("target")
        if target is not None and target.get("name"):
            parts.append(target.get("name", ""))
        model = element.find("model")
        if model is not None and model.get("type"):
            parts.append(model.get("type", ""))
    return " ".join(p for p in parts if p)


def read_saved_domain(xml: str) -> "SavedDomain":
    """The facts of a memory image's domain definition (``saveImageGetXMLDesc``)."""
    from bbsnap.hypervisor import SavedDomain

    root = ET.fromstring(xml)
    disks = {}
    for disk in root.findall("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is not None and source is not None and (source.get("file") or
                                                          source.get("dev")):
            disks[target.get("dev", "")] = source.get("file") or source.get("dev") or ""
    return SavedDomain(name=root.findtext("name", ""), uuid=root.findtext("uuid", ""),
                       hardware=read_hardware(xml), disks=disks)


def replace_disk_sources(xml: str, sources: dict[str, Path]) -> str:
    """The domain XML with each disk in *sources* (device -> file) pointed at its new file
    (a memory image restored onto new overlays: never onto the snapshot's own files)."""
    for target, path in sources.items():
        xml = replace_disk_source(xml, target, path)
    return xml


def copy_descriptive(source_xml: str, xml: str) -> str:
    """*xml* with the title, description and metadata of *source_xml* (none of which the
    guest sees)."""
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    ET.register_namespace("qemu", QEMU_NS)
    source, root = ET.fromstring(source_xml), ET.fromstring(xml)
    for tag in ("title", "description", "metadata"):
        for old in root.findall(tag):
            root.remove(old)
        new = source.find(tag)
        if new is not None:
            root.insert(2, new)  # after <name> and <uuid>
    return ET.tostring(root, encoding="unicode")
