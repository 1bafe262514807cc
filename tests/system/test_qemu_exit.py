"""The adapter's destroy ends a local domain's QEMU itself, with the monitor held open until
the kernel has reaped it, so libvirt 9.0's destroy finds nothing to wait 200 ms for
(bbsnap/hypervisor/qemu_exit.py). Real libvirtd, real QEMU: what libvirt records (the
shutoff reason) and what QEMU logs (who sent the SIGTERM) tell which way it went."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import libvirt
import pytest

from bbsnap.hypervisor import qemu_exit
from tests.system.conftest import URI, define_xml, wait_until

BLANK = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>
<os><type arch='x86_64' machine='pc'>hvm</type></os>{extra}<devices/></domain>"""


def _start_blank(hypervisor, domains, extra: str = "") -> tuple[str, int]:
    name = domains.new_name()
    define_xml(BLANK.format(name=name, extra=extra))
    hypervisor.start(name)
    pid_path = qemu_exit.pid_file(URI, name)
    assert pid_path is not None
    return name, int(pid_path.read_text())


def _shutoff_reason(name: str) -> tuple[int, int]:
    conn = libvirt.open(URI)
    try:
        state, reason = conn.lookupByName(name).state()
        return state, reason
    finally:
        conn.close()


def _terminated_by(name: str) -> str:
    lines = Path(f"/var/log/libvirt/qemu/{name}.log").read_text().splitlines()
    said = [line for line in lines if "terminating on signal 15 from pid" in line]
    assert said, f"QEMU did not log a SIGTERM: {lines[-3:]}"
    return said[-1].split("from pid ")[1].split()[0]


def _socket_inodes(pid: str | int) -> set[str]:
    """The socket inodes a process holds open."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if link.startswith("socket:["):
            found.add(link[8:-1])
    return found


def test_destroy_ends_qemu_itself_and_libvirt_records_a_destroy(hypervisor, domains):
    name, pid = _start_blank(hypervisor, domains)
    qemus = _socket_inodes(pid)
    hypervisor.destroy(name)
    assert _shutoff_reason(name) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)
    assert _terminated_by(name) == str(os.getpid())  # this process's SIGTERM, not libvirtd's
    assert not Path(f"/proc/{pid}").exists()
    assert not _socket_inodes("self") & qemus, "a duplicated QEMU socket was left open"
    hypervisor.start(name)  # libvirt's state is whole: the domain starts again
    assert hypervisor.info(name).state.value == "running"


def test_a_discarding_destroy_kills_qemu_and_libvirt_records_a_destroy(hypervisor, domains):
    """A memory revert throws QEMU's state away: SIGKILL (QEMU logs no signal 15), and
    libvirt's state is as after any destroy."""
    name, pid = _start_blank(hypervisor, domains)
    qemus = _socket_inodes(pid)
    log = Path(f"/var/log/libvirt/qemu/{name}.log")
    before = log.read_text()
    hypervisor.destroy(name, discarding=True)
    assert _shutoff_reason(name) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)
    assert "terminating on signal" not in log.read_text()[len(before):]
    assert not Path(f"/proc/{pid}").exists()
    assert not _socket_inodes("self") & qemus, "a duplicated QEMU socket was left open"
    hypervisor.start(name)
    assert hypervisor.info(name).state.value == "running"


def test_a_domain_that_restarts_on_poweroff_is_destroyed_all_the_same(hypervisor, domains):
    # QEMU's SHUTDOWN event sets off libvirt's fake reboot, which sends the dead QEMU a
    # command: with the monitor held for good the destroy waited 30 s and failed.
    name, _ = _start_blank(hypervisor, domains, "<on_poweroff>restart</on_poweroff>")
    hypervisor.destroy(name)
    assert _shutoff_reason(name) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)
    assert _terminated_by(name) == str(os.getpid())


def test_without_leave_to_take_qemus_sockets_libvirt_ends_it(hypervisor, domains, monkeypatch):
    def refused(pidfd: int, fd: int) -> int:  # as under a ptrace restriction (Yama)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(qemu_exit, "_pidfd_getfd", refused)
    name, pid = _start_blank(hypervisor, domains)
    hypervisor.destroy(name)
    assert _shutoff_reason(name) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)
    assert _terminated_by(name) != str(os.getpid())  # libvirtd's own SIGTERM
    assert not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("uuid_matches", [True, False])
def test_only_the_domains_own_qemu_is_signalled(hypervisor, domains, tmp_path, uuid_matches):
    """A stale pid file naming another process (the pid reused) signals nothing."""
    name, pid = _start_blank(hypervisor, domains)
    uuid = hypervisor.info(name).uuid if uuid_matches else "00000000-0000-4000-8000-000000000000"
    with qemu_exit.ended_first(qemu_exit.pid_file(URI, name), uuid) as ended:
        assert ended is uuid_matches
        assert Path(f"/proc/{pid}").exists() is not uuid_matches
    hypervisor.destroy(name)
    assert not Path(f"/proc/{pid}").exists()


def test_a_process_killed_while_it_holds_qemus_monitor_leaves_the_domain_shut_off(
        hypervisor, domains):
    """SIGKILL between QEMU's end and libvirt's destroy: the kernel closes the held sockets,
    libvirt sees QEMU gone and marks the domain off, as after QEMU crashed."""
    name, pid = _start_blank(hypervisor, domains)
    script = textwrap.dedent(f"""
        import sys, time
        from bbsnap.hypervisor import qemu_exit
        with qemu_exit.ended_first(qemu_exit.pid_file({URI!r}, {name!r}),
                                   {hypervisor.info(name).uuid!r}) as ended:
            print(ended, flush=True)
            sys.stdin.read()  # killed here, holding QEMU's monitor
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "True"
        assert not Path(f"/proc/{pid}").exists()
        holder.kill()
    finally:
        holder.wait(timeout=30)
    wait_until(lambda: hypervisor.info(name).state.value == "shutoff", 30,
               "libvirt to see the domain's QEMU gone")
    hypervisor.start(name)
    assert hypervisor.info(name).state.value == "running"
