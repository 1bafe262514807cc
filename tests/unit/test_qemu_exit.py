"""The parts of qemu_exit that read /proc and libvirt's layout (the rest: tests/system)."""

from __future__ import annotations

from pathlib import Path

from bbsnap.hypervisor import qemu_exit

NET_UNIX = """Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 31337 /var/lib/libvirt/qemu/domain-1-x/monitor.sock
0000000000000000: 00000003 00000000 00000000 0001 03 31338 /var/lib/libvirt/qemu/domain-1-x/monitor.sock
0000000000000000: 00000003 00000000 00000000 0001 03 31339
0000000000000000: 00000002 00000000 00000000 0002 01 31340
"""


def test_only_connected_sockets_are_taken():
    assert qemu_exit.connected_unix_inodes(NET_UNIX) == {"31338", "31339"}
    assert qemu_exit.connected_unix_inodes("Num RefCount\n") == set()


def test_the_domains_qemu_is_known_by_its_uuid():
    uuid = "5d2c6f0e-1b1a-4e57-9a52-1f0b3c3f1a2b"
    cmdline = b"/usr/bin/qemu-system-x86_64\0-name\0guest=x\0-uuid\0" + uuid.encode() + b"\0-m\0128\0"
    assert qemu_exit.is_domains_qemu(cmdline, uuid)
    assert qemu_exit.is_domains_qemu(cmdline, uuid.upper())
    assert not qemu_exit.is_domains_qemu(cmdline, "5d2c6f0e-1b1a-4e57-9a52-1f0b3c3f1a2c")
    assert not qemu_exit.is_domains_qemu(b"sleep\0" + uuid.encode() + b"\0", uuid)


def test_pid_files_of_local_drivers_only(monkeypatch):
    assert qemu_exit.pid_file("qemu:///system", "a") == Path("/run/libvirt/qemu/a.pid")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert qemu_exit.pid_file("qemu:///session", "a") == Path(
        "/run/user/1000/libvirt/qemu/run/a.pid")
    assert qemu_exit.pid_file("qemu+ssh://host/system", "a") is None
    assert qemu_exit.pid_file("test:///default", "a") is None


def test_nothing_is_done_without_a_pid_file(tmp_path):
    with qemu_exit.ended_first(tmp_path / "missing.pid", "x") as ended:
        assert ended is False
    with qemu_exit.ended_first(None, "x") as ended:
        assert ended is False
