"""bbsnap as a normal user's daily work, as that real user (tests/other_user.py): no sudo.

A member of the libvirt group gets qemu:///system (polkit's libvirt rule lets them in; setup
starts the system bus and polkitd before libvirtd), with the data directory in a 0700 home
that `doctor --fix` opens to QEMU's user alone with an ACL. A user outside the group gets
qemu:///session, where a session libvirtd runs as them (autostarted by libvirt), and their
own domains made with plain virsh are servers too. The tiny guest proves the disks: the
clone's console shows its own seed and it counts on from the snapshot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from bbsnap.tinyguest import read_counter
from tests.other_user import ALL_USERS_PREFIX, Account, throwaway_user
from tests.wheelhouse import repack
from tests.system.conftest import wait_for_console_line, wait_until

pytestmark = pytest.mark.system


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def _create(user: Account, image: str, *args: str) -> str:
    return _ok(user.bbsnap("servers", "create", "--memory", "128", *args, image, "-s")).split("\t")[0]


def _console(user: Account, server: str) -> Path:
    return user.data_dir / "servers" / server / "console.log"


def _counters(log: Path) -> list[int]:
    return _counters_in(log.read_text(errors="replace") if log.exists() else "")


def _counters_in(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^BBSNAP-COUNTER (\d+)", text, re.MULTILINE)]


def _snapshot_and_clone(user: Account, server: str) -> tuple[str, str]:
    """Snapshot the running tiny guest once it has counted on its disk (waiting for the
    copy), boot a clone from it: the clone's counter starts where the disk was, not at 0."""
    wait_until(lambda: max(_counters(_console(user, server)), default=0) >= 50, 180,
               "the tiny guest to count to 50")
    snapshot = _ok(user.bbsnap("servers", "snapshot", server, "--wait")).split()[0]
    clone = _create(user, snapshot)
    seed = wait_for_console_line(_console(user, clone), "BBSNAP-SEED")
    assert f"instance-id={clone}" in seed
    started = wait_for_console_line(_console(user, clone), "BBSNAP-COUNTER")
    assert int(started.split()[1]) >= 50  # the snapshot holds the original's writes
    # and the user's own bbsnap reads the console (the log stays theirs)
    assert "BBSNAP-SEED" in _ok(user.bbsnap("servers", "console", clone))
    return snapshot, clone


def _destroy_all(user: Account, uri: str) -> None:
    """Whatever a test left: the user's servers, by their directories, through root."""
    servers = user.data_dir / "servers"
    names = [p.name for p in servers.iterdir() if p.name.startswith("srv-")] \
        if servers.is_dir() else []
    for name in names:
        for verb in (["destroy", name], ["undefine", "--nvram", name]):
            if uri == "qemu:///system":
                subprocess.run(["virsh", "-q", "-c", uri, *verb], capture_output=True, timeout=60)
            else:
                user.run("virsh", "-q", "-c", uri, *verb, timeout=60)


def test_libvirt_group_member_on_qemu_system_from_a_0700_home(tiny_guest_image):
    with throwaway_user(libvirt_group=True) as user:
        try:
            guest = user.give(tiny_guest_image, "tiny.qcow2")
            doctor = user.bbsnap("doctor")
            assert "qemu:///system (automatic: you are in the 'libvirt' group)" in doctor.stdout
            assert doctor.returncode == 1
            assert f"cannot enter {user.home} (0700)" in doctor.stdout
            assert f"setfacl -m u:libvirt-qemu:x {user.home}" in doctor.stdout
            image = _ok(user.bbsnap("images", "import", str(guest), "-n", "tiny",
                                    "--min-ram", "128")).strip()

            # Refused before anything is made or printed: QEMU could not open the disk.
            refused = user.bbsnap("servers", "create", "--memory", "128", image)
            assert refused.returncode == 4, refused.stderr
            assert "Creating" not in refused.stderr and "doctor --fix" in refused.stderr
            assert not list((user.data_dir / "servers").glob("srv-*"))

            fixed = user.bbsnap("doctor", "--fix")
            assert f"granted QEMU's user passage: setfacl -m u:libvirt-qemu:x {user.home}" \
                in fixed.stderr
            assert re.search(r"ok +data directory access", fixed.stdout), fixed.stdout
            # exactly execute for libvirt-qemu; the home is not opened to anyone else
            acl = subprocess.run(["getfacl", "-cp", str(user.home)], capture_output=True,
                                 text=True, check=True).stdout.split()
            assert sorted(acl) == sorted(["user::rwx", "user:libvirt-qemu:--x", "group::---",
                                          "mask::--x", "other::---"])
            assert user.home.stat().st_mode & 0o007 == 0

            server = _create(user, image)
            snapshot, clone = _snapshot_and_clone(user, server)
            # the user still reads the images libvirt handed to QEMU's user: export works
            out = user.home / "snap.gz"
            _ok(user.bbsnap("images", "export", snapshot, "-o", str(out)))
            _ok(user.run("sha256sum", "-c", "snap.gz.sha256"))
            assert (user.data_dir / "connection.json").read_text().strip() == \
                '{"connect": "qemu:///system"}'
            _ok(user.bbsnap("servers", "destroy", clone, server))
        finally:
            _destroy_all(user, "qemu:///system")


def test_uefi_servers_of_a_libvirt_group_member_on_qemu_system(tiny_guest_image):
    """OVMF under qemu:///system for a normal user: libvirt (root) makes each server's NVRAM
    store from OVMF's template and removes it with the server; the user's disks, snapshot
    and revert work as for BIOS servers."""
    with throwaway_user(libvirt_group=True) as user:
        try:
            guest = user.give(tiny_guest_image, "tiny.qcow2")
            _ok(user.bbsnap("doctor", "--fix"))
            image = _ok(user.bbsnap("images", "import", str(guest), "-n", "tiny uefi",
                                    "--firmware", "uefi")).strip()
            (server,) = json.loads(_ok(user.bbsnap("servers", "create", image, "--memory",
                                                   "256", "--format", "json")))
            assert server["firmware"] == "uefi"
            console = _console(user, server["id"])
            wait_for_console_line(console, "BBSNAP-TINY-READY")
            shown = subprocess.run(["virsh", "-q", "-c", "qemu:///system", "dumpxml",
                                    server["id"]], capture_output=True, text=True, check=True)
            (store,) = re.findall(r"<nvram[^>]*>([^<]+)</nvram>", shown.stdout)
            assert Path(store).is_file() and "type='pflash'" in shown.stdout

            wait_until(lambda: max(_counters(console), default=0) >= 50, 180,
                       "the UEFI guest to count to 50")
            snapshot = _ok(user.bbsnap("servers", "snapshot", server["id"], "--wait")).split()[0]
            at_snapshot = read_counter(user.data_dir / "images" / f"{snapshot}.qcow2")
            assert at_snapshot is not None
            assert '"firmware": "uefi"' in _ok(user.bbsnap("images", "show", snapshot,
                                                            "--format", "json"))
            wait_until(lambda: max(_counters(console), default=0) > at_snapshot + 50, 180,
                       "the UEFI guest to count past the snapshot")
            size_before = console.stat().st_size
            _ok(user.bbsnap("servers", "revert", server["id"], snapshot))

            def booted_again() -> int | None:  # the console log is appended to across boots
                found = _counters_in(console.read_bytes()[size_before:].decode(errors="replace"))
                return found[0] if found else None

            assert wait_until(booted_again, 180, "the reverted UEFI guest to boot") == \
                at_snapshot, "booted through OVMF from the snapshot's disk"
            _ok(user.bbsnap("servers", "destroy", server["id"]))
            assert not Path(store).exists(), "libvirt removed the server's NVRAM store"
        finally:
            _destroy_all(user, "qemu:///system")


def _foreign_domain_xml(name: str, disk: Path, log: Path) -> str:
    # The serial console goes to a file the user's QEMU writes, truncated at each start.
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>"
            "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>"
            "<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
            f"<serial type='file'><source path='{log}' append='off'/></serial>"
            "<memballoon model='none'/></devices></domain>")


def test_user_outside_the_group_gets_qemu_session_and_their_own_domains(tiny_guest_image):
    with throwaway_user(libvirt_group=False) as user:
        foreign = "bbsnap-test-user-" + uuid.uuid4().hex[:6]
        try:
            doctor = _ok(user.bbsnap("doctor"))
            assert "qemu:///session (automatic: you are not in the 'libvirt' group)" in doctor
            assert "QEMU runs as you on qemu:///session" in doctor
            _ok(user.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                         str(user.home / ".ssh" / "id_ed25519")))
            guest = user.give(tiny_guest_image, "tiny.qcow2")
            image = _ok(user.bbsnap("images", "import", str(guest), "-n", "tiny",
                                    "--min-ram", "128")).strip()
            server = _create(user, image)
            snapshot, clone = _snapshot_and_clone(user, server)
            # user-mode networking and the 127.0.0.1 forward, with the user's own key
            wait_for_console_line(_console(user, clone), "BBSNAP-SSH started")
            assert _ok(user.bbsnap("servers", "ssh", clone, "--", "hostname")).strip() == clone
            _ok(user.bbsnap("servers", "destroy", clone, server))

            # A domain the user made with plain virsh: listed, snapshotted (with a login
            # user recorded, or without), cloned.
            disk = user.give(tiny_guest_image, "foreign.qcow2")
            xml = user.home / "foreign.xml"
            log = user.home / "foreign.log"
            xml.write_text(_foreign_domain_xml(foreign, disk, log))
            _ok(user.run("virsh", "-q", "-c", "qemu:///session", "define", str(xml)))
            _ok(user.run("virsh", "-q", "-c", "qemu:///session", "start", foreign))
            assert foreign in _ok(user.bbsnap("servers", "list", "-s"))
            wait_until(lambda: max(_counters(log), default=0) >= 50, 180,
                       "the user's own guest to count to 50")
            # The one without first: a snapshot stored on one that records a login user
            # takes it (the named one's "tiny" would reach the clone below).
            unnamed = _ok(user.bbsnap("servers", "snapshot", foreign, "--wait")).split()[0]
            named = _ok(user.bbsnap("servers", "snapshot", foreign, "--username", "tiny",
                                    "--wait")).split()[0]
            at_named = read_counter(user.data_dir / "images" / f"{named}.qcow2")
            assert at_named is not None and at_named >= 50
            assert '"username": "tiny"' in _ok(user.bbsnap("images", "show", named,
                                                            "--format", "json"))
            other_key = user.home / "other"
            _ok(user.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)))
            clone = _create(user, unnamed, "--ssh-key", f"{other_key}.pub")
            wait_for_console_line(_console(user, clone), "BBSNAP-SSH started")
            # root with the user's key is refused (the guest got another key): the error
            # names the user to pass and where to record it
            refused = user.bbsnap("servers", "ssh", clone, "--", "true", timeout=120)
            assert refused.returncode == 1, refused.stderr
            assert f"ssh to server {clone} as root failed" in refused.stderr
            assert f"bbsnap servers ssh {clone} -l USER" in refused.stderr
            assert f"bbsnap images update {unnamed} -u USER" in refused.stderr
            _ok(user.bbsnap("servers", "destroy", clone))

            # The user reverts their own VM to its first snapshot: it boots from the
            # snapshot's disk, in a directory of its own in the user's data directory (QEMU
            # runs as the user: their files, no ACL needed), the disk it came with kept.
            wait_until(lambda: max(_counters(log), default=0) > at_named + 50, 180,
                       "the user's own guest to count past the snapshot")
            reverted = user.bbsnap("servers", "revert", foreign, named, "--format", "json")
            assert reverted.returncode == 0, reverted.stderr
            (after,) = json.loads(reverted.stdout)
            assert after["status"] == "active" and after["managed"] is False
            assert f"previous disk vda is kept at {disk}" in reverted.stderr and disk.exists()
            started = wait_for_console_line(log, "BBSNAP-COUNTER")
            assert int(started.split()[1]) == at_named, "booted from the snapshot's disk"
            (new_disk,) = map(Path, after["disks"])
            directory = user.data_dir / "servers" / f"dom-{after['uuid']}"
            assert new_disk.parent == directory
            for path, mode in ((directory, 0o711), (new_disk, 0o600)):
                info = path.stat()
                assert (info.st_uid, info.st_mode & 0o7777) == (user.uid, mode), path
            assert not _acl_entries(new_disk), "no ACL: QEMU is the user on qemu:///session"
            assert "dom-" not in _ok(user.bbsnap("doctor")), "doctor knows whose it is"
        finally:
            _destroy_all(user, "qemu:///session")
            user.run("virsh", "-q", "-c", "qemu:///session", "destroy", foreign, timeout=60)
            user.run("virsh", "-q", "-c", "qemu:///session", "undefine", foreign, timeout=60)


def _acl_entries(path: Path) -> list[str]:
    """Named ACL entries of *path* (getfacl lists user::, group::, other:: for every file)."""
    listed = subprocess.run(["getfacl", "-cp", str(path)], capture_output=True, text=True,
                            check=True).stdout.split()
    return [e for e in listed if e.split(":")[1] and not e.startswith("mask")]


def test_a_users_own_pipx_install_uses_debians_libvirt_python(tiny_guest_image):
    """`pipx install --system-site-packages` of a checkout, as a normal user, with Debian's
    pipx and python3-libvirt (scripts/setup installs both): libvirt-python comes from the
    system (nothing to compile), the rest from wheels (repacked from the all-users install:
    the test stays off the network), and the user's own bbsnap reaches their connection."""
    with throwaway_user(libvirt_group=False) as user:
        try:
            checkout = Path(__file__).parents[2]
            source = user.home / "bbsnap-src"
            source.mkdir()
            for name in ("pyproject.toml", "README.md"):
                shutil.copyfile(checkout / name, source / name)
            shutil.copytree(checkout / "bbsnap", source / "bbsnap",
                            ignore=shutil.ignore_patterns("__pycache__"))
            wheels = repack(ALL_USERS_PREFIX / "lib" / "python3.11" / "site-packages",
                            ["click", "pyyaml", "pycdlib", "isal", "backports_zstd"],
                            user.home / "wheels")
            assert len(wheels) == 5
            subprocess.run(["chown", "-R", f"{user.name}:{user.name}", str(source),
                            str(user.home / "wheels")], check=True)
            alone = {"PYTHONPATH": ""}  # not the copy of the code other tests run
            _ok(user.run("pipx", "install", "--system-site-packages", "--pip-args",
                         f"--no-index --find-links={user.home / 'wheels'} --no-build-isolation",
                         str(source), timeout=600, env=alone))
            own = user.home / ".local" / "bin" / "bbsnap"
            assert own.exists()
            python = user.home / ".local" / "pipx" / "venvs" / "bbsnap" / "bin" / "python"
            found = _ok(user.run(str(python), "-c", "import bbsnap, libvirt; "
                                 "print(libvirt.__file__); print(bbsnap.__file__)", env=alone)).split()
            assert found[0] == "/usr/lib/python3/dist-packages/libvirt.py", "Debian's build"
            assert found[1].startswith(str(user.home / ".local" / "pipx")), "the user's copy"
            doctor = _ok(user.run(str(own), "doctor", env=alone))
            assert "qemu:///session (automatic: you are not in the 'libvirt' group)" in doctor
            assert _ok(user.run(str(own), "servers", "list", "-s", env=alone)) == ""
        finally:
            _destroy_all(user, "qemu:///session")


@pytest.mark.parametrize("in_group", [True, False], ids=["qemu-system", "qemu-session"])
def test_the_walkthrough_as_a_normal_user(tiny_guest_image, in_group):
    """examples/walkthrough.sh as the quick start runs it for SUDO_USER: doctor --fix, import,
    create, snapshot while running, clone, export (checked with sha256sum -c), destroy."""
    uri = "qemu:///system" if in_group else "qemu:///session"
    with throwaway_user(libvirt_group=in_group) as user:
        try:
            script = user.code / "walkthrough.sh"
            script.write_text((Path(__file__).parents[2] / "examples" / "walkthrough.sh")
                              .read_text())
            guest = user.give(tiny_guest_image, "tiny.qcow2")
            (user.home / "tmp").mkdir()
            os.chown(user.home / "tmp", user.uid, -1)
            done = user.run("bash", str(script), timeout=900,
                            env={"BBSNAP_TINY_GUEST": str(guest), "TMPDIR": str(user.home / "tmp")})
            assert done.returncode == 0, done.stderr[-3000:]
            assert f"{uri} (automatic: you are" in done.stdout
            assert ": OK" in done.stdout  # sha256sum -c of the export
            assert "BBSNAP-SEED instance-id=" in done.stdout
            assert re.search(r"ok +data directory access", done.stdout), done.stdout
        finally:
            _destroy_all(user, uri)
