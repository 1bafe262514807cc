"""System-test fixtures: the real libvirtd (qemu:///system), the tiny real guest, TCG.

Nothing is mocked here. If libvirtd does not answer, the tests fail (they do
not skip): `scripts/test` and `.ci/run` start it before running pytest.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from bbsnap.state.catalogue import Catalogue
from tests.conftest import Bbsnap

from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor
from bbsnap.errors import NotFoundError
from bbsnap.tinyguest import build_tiny_guest

URI = "qemu:///system"
SMALL = ("--memory", "128")
TEST_DOMAIN_PREFIX = "bbsnap-test-"
FIRST_BOOT_TIMEOUT = 240.0  # the first start after installing QEMU re-probes capabilities


@pytest.fixture(scope="session")
def hypervisor() -> Iterator[LibvirtHypervisor]:
    hv = LibvirtHypervisor(URI)
    try:
        hv.version()
    except Exception as exc:
        pytest.fail(f"libvirtd does not answer on {URI} ({exc}); run scripts/setup first")
    yield hv
    hv.close()


@pytest.fixture(scope="session")
def tiny_guest_image() -> Path:
    return build_tiny_guest()


class DomainJanitor:
    """Names test domains and removes every one of them at the end, whatever happened."""

    def __init__(self, hv: LibvirtHypervisor) -> None:
        self.hv = hv
        self.names: list[str] = []

    def new_name(self) -> str:
        name = TEST_DOMAIN_PREFIX + uuid.uuid4().hex[:8]
        self.names.append(name)
        return name

    def cleanup(self) -> None:
        for name in self.names:
            try:
                self.hv.destroy(name)
            except NotFoundError:
                continue
            try:
                self.hv.undefine(name)
            except NotFoundError:
                pass


@pytest.fixture()
def domains(hypervisor: LibvirtHypervisor) -> Iterator[DomainJanitor]:
    janitor = DomainJanitor(hypervisor)
    yield janitor
    janitor.cleanup()


def wait_for_console_line(log: Path, wanted: str, timeout: float = FIRST_BOOT_TIMEOUT) -> str:
    """Poll the serial log until a line starting with *wanted* appears; return that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists():
            # Whole lines only: QEMU writes the serial console a character at a time, and a
            # half-written "BBSNAP-COUNTER 17" once read as counter 1 under load.
            for line in log.read_text(errors="replace").splitlines(keepends=True):
                if line.endswith("\n") and line.strip().startswith(wanted):
                    return line.strip()
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no console log)"
    raise AssertionError(f"'{wanted}' did not appear on the console within {timeout:g} s:\n{tail}")


def start_two_disk_domain(hypervisor: LibvirtHypervisor, name: str, work_dir: Path,
                          tiny_guest_image: Path, data_size: str) -> None:
    """Define and boot *name*, a domain bbsnap did not create: the tiny guest on vda (a
    standalone copy) and a *data_size* qcow2 data disk on vdb holding 0x42 at 1 MiB-2 MiB."""
    from bbsnap.hypervisor import DiskSpec, DomainSpec
    from bbsnap.tinyguest import READY_LINE

    boot, data = work_dir / "boot.qcow2", work_dir / "data.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(tiny_guest_image), str(boot)],
                   check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), data_size], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 1M 1M", str(data)],
                   check=True, capture_output=True)
    hypervisor.define(DomainSpec(
        name=name, uuid=str(uuid.uuid4()), memory_mib=128, vcpus=1, accel="tcg",
        disks=(DiskSpec(boot), DiskSpec(data, target="vdb")),
        console_log=work_dir / "console.log"))
    hypervisor.start(name)
    wait_for_console_line(work_dir / "console.log", READY_LINE)


def tiny_guest_with_data(tiny_guest_image: Path, path: Path, write: str) -> Path:
    """A standalone copy of the tiny guest at *path*, grown to a 1 GiB disk, with qemu-io's
    `write -P` *write* ("PATTERN OFFSET LENGTH") done past its partition: data for a
    snapshot's copy to have to carry."""
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(tiny_guest_image), str(path)],
                   check=True)
    subprocess.run(["qemu-img", "resize", "-q", str(path), "1G"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {write}", str(path)],
                   check=True, capture_output=True)
    return path


def wait_until(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture()
def cloud(data_dir: Path, tiny_guest_image: Path, hypervisor):
    """A data directory with the tiny guest imported; every server made in it is removed."""
    runner = Bbsnap(data_dir, env={"BBSNAP_ACCEL": "tcg", "LIBVIRT_DEFAULT_URI": URI})
    imported = runner("images", "import", str(tiny_guest_image), "--name", "tiny",
                      "--username", "root")
    assert imported.exit_code == 0, imported.stderr
    runner.image_id = imported.stdout.strip()  # type: ignore[attr-defined]
    yield runner
    for info in hypervisor.list_domains():
        xml = hypervisor.domain_xml(info.name)
        if str(data_dir) in xml:
            hypervisor.destroy(info.name)
            hypervisor.undefine(info.name)


def create_server(cloud, *args: str, image: str | None = None) -> list[dict]:
    """`servers create` (128 MiB) from *image*, by default the fixture's tiny guest."""
    result = cloud("servers", "create", image or cloud.image_id, *SMALL, *args,
                   "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def server_record(cloud, server_id: str) -> dict:
    """`servers show SRV --format json`, which must succeed."""
    result = cloud("servers", "show", server_id, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes: proof that a snapshot's stored files were not written."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_record(cloud, image_id: str) -> dict:
    result = cloud("images", "show", image_id, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def wait_settled(cloud, image_id: str, timeout: float = 180) -> dict:
    """Until the image leaves `creating` (each look also runs crash recovery)."""
    def settled():
        record = image_record(cloud, image_id)
        return record if record["state"] != "creating" else None
    return wait_until(settled, timeout, f"{image_id} to leave creating")


def console_path(cloud, server_id: str) -> Path:
    return cloud.data_dir / "servers" / server_id / "console.log"


def backing_file(disk: str) -> tuple[str, str]:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", disk],
                                     check=True, capture_output=True, text=True).stdout)
    return info["backing-filename"], info["backing-filename-format"]


def nothing_left(cloud, hypervisor) -> None:
    leftovers = [p.name for p in (cloud.data_dir / "servers").iterdir() if not p.name.startswith(".")]
    assert leftovers == [], f"server files left behind: {leftovers}"
    for info in hypervisor.list_domains():
        assert str(cloud.data_dir) not in hypervisor.domain_xml(info.name), f"domain {info.name} left"
    catalogue = Catalogue(cloud.data_dir / "catalogue.sqlite3")
    assert catalogue.dependents(cloud.image_id) == []
    catalogue.close()


def define_xml(xml: str) -> None:
    """(Re)define a domain from raw libvirt XML, as another tool or a user with virsh would:
    the port itself only takes bbsnap's DomainSpec."""
    import libvirt

    conn = libvirt.open(URI)
    try:
        conn.defineXML(xml)
    finally:
        conn.close()


def qemu_monitor(domain: str, command: str, *, hmp: bool = False) -> str:
    """One command to a running domain's QEMU monitor (QMP JSON, or HMP text)."""
    import libvirt
    import libvirt_qemu

    conn = libvirt.open(URI)
    try:
        flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP if hmp else 0
        return str(libvirt_qemu.qemuMonitorCommand(conn.lookupByName(domain), command, flags))
    finally:
        conn.close()


def agent_answers(domain: str) -> bool:
    """Whether the running domain's guest agent answers a ping (through libvirt)."""
    import libvirt
    import libvirt_qemu

    conn = libvirt.open(URI)
    try:
        libvirt_qemu.qemuAgentCommand(conn.lookupByName(domain), '{"execute": "guest-ping"}',
                                      2, 0)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def write_into_running_disk(domain: str, command: str) -> None:
    """Run a qemu-io *command* (e.g. "write -P 0x44 512M 256M") on the running domain's first
    virtio disk, through the device's own block backend: the writes take the guest's path, so
    QEMU's dirty bitmaps record them, and need no guest cooperation."""
    out = qemu_monitor(domain, f'qemu-io -d virtio-disk0/virtio-backend "{command}"', hmp=True)
    # The monitor answers only when the command could not run; qemu-io's own report (and an
    # I/O error) goes to QEMU's log, so callers check what the writes did.
    assert not out.strip(), out


def set_backup_speed(domain: str, speed: int) -> list[int]:
    """Throttle (or release, speed 0) the domain's running backup jobs through QEMU's own
    monitor; returns how many bytes each job has to copy in all (QEMU's "len")."""
    jobs = json.loads(qemu_monitor(domain, '{"execute": "query-block-jobs"}'))["return"]
    for job in jobs:
        qemu_monitor(domain, json.dumps({"execute": "block-job-set-speed",
                                         "arguments": {"device": job["device"], "speed": speed}}))
    return [int(job["len"]) for job in jobs]

