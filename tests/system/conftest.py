"""System-test fixtures: the real libvirtd (qemu:///system), the tiny real guest, TCG.

Nothing is mocked here. If libvirtd does not answer, the tests fail (they do
not skip): `scripts/test` and `.ci/run` start it before running pytest.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor
from bbsnap.errors import NotFoundError
from bbsnap.tinyguest import build_tiny_guest

URI = "qemu:///system"
TEST_DOMAIN_PREFIX = "bbsnap-test-"
FIRST_BOOT_TIMEOUT = 240.0  # the first start after installing QEMU re-probes capabilities


@pytest.fixture(scope="session")
def hypervisor() -> Iterator[LibvirtHypervisor]:
    hv = LibvirtHypervisor(URI)
    try:
        hv.version()
    except Exception as exc:  # noqa: BLE001 - turn any failure into a clear test failure
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
            for line in log.read_text(errors="replace").splitlines():
                if line.strip().startswith(wanted):
                    return line.strip()
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no console log)"
    raise AssertionError(f"'{wanted}' did not appear on the console within {timeout:g} s:\n{tail}")


def wait_until(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
