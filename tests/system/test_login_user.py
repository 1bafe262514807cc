"""The login user of a domain bbsnap did not create, taken from its guest agent at snapshot
time, under the real libvirtd (TCG) with the tiny guest's real qemu-ga.

The domain is defined through plain libvirt XML (as virsh or virt-manager would), with a
guest-agent channel. Its tiny guest's utmp says root, "tiny" and an older user are logged in:
the snapshot's worker records "tiny" and says so in the image's log, and `servers ssh` on a
clone logs in as tiny with no -l. A domain whose agent is absent records no user (servers
ssh then names the one to pass), and one whose agent hangs at the freeze is not asked for
one.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from xml.sax.saxutils import quoteattr

from bbsnap.tinyguest import READY_LINE
from bbsnap.tinyguest.logins import LOGIN_USER
from tests.system.conftest import (agent_answers, console_path, create_server, define_xml,
                                   wait_for_console_line, wait_settled, wait_until)


def _domain_xml(name: str, disk: Path, log: Path, *, agent: bool) -> str:
    channel = ("<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>"
               "</channel>") if agent else ""
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>"
            "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>"
            "<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file={quoteattr(str(disk))}/><target dev='vda' bus='virtio'/></disk>"
            f"<serial type='file'><source path={quoteattr(str(log))}/></serial>"
            f"{channel}<memballoon model='none'/></devices></domain>")


def _foreign(domains, work_dir: Path, tiny_guest_image: Path, *, agent: bool) -> str:
    name = domains.new_name()
    disk = work_dir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(tiny_guest_image), str(disk)],
                   check=True)
    log = work_dir / f"{name}.log"
    define_xml(_domain_xml(name, disk, log, agent=agent))
    subprocess.run(["virsh", "-q", "-c", "qemu:///system", "start", name], check=True,
                   capture_output=True)
    wait_for_console_line(log, READY_LINE)
    if agent:  # libvirt sees the agent's channel connect a little after qemu-ga starts
        wait_until(lambda: agent_answers(name), 60, "the guest agent to answer")
    return name


def test_the_agents_login_user_is_recorded_and_a_clone_is_reached_as_that_user(
        cloud, domains, work_dir, tiny_guest_image):
    name = _foreign(domains, work_dir, tiny_guest_image, agent=True)
    done = cloud("servers", "snapshot", name)
    assert done.exit_code == 0, done.stderr
    snapshot = done.stdout.strip()
    assert "logged-in" not in done.stderr  # the worker asks, while QEMU copies
    record = wait_settled(cloud, snapshot)
    assert (record["state"], record["username"], record["ancestor_id"]) == (
        "available", LOGIN_USER, None)
    log = (cloud.data_dir / "logs" / f"{snapshot}.log").read_text()
    assert (f"note: the guest agent of {name} reports {LOGIN_USER} as the most recently "
            f"logged-in user other than root: recorded as {snapshot}'s login user") in log
    assert record["consistency"] == "quiesced"

    key = work_dir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (clone,) = create_server(cloud, "--ssh-key", f"{key}.pub", image=snapshot)
    wait_for_console_line(console_path(cloud, clone["id"]), "BBSNAP-SSH started")
    reached = cloud.process("servers", "ssh", clone["id"], "-i", str(key), "--", "id -un",
                            timeout=120)
    assert reached.exit_code == 0, reached.stderr
    assert reached.stdout.strip() == LOGIN_USER
    assert cloud("servers", "destroy", clone["id"]).exit_code == 0


def test_without_an_agent_no_login_user_is_recorded(cloud, domains, work_dir,
                                                    tiny_guest_image):
    name = _foreign(domains, work_dir, tiny_guest_image, agent=False)
    done = cloud("servers", "snapshot", name)
    assert done.exit_code == 0, done.stderr
    assert "logged-in" not in done.stderr and "crash-consistent" in done.stderr
    assert wait_settled(cloud, done.stdout.strip())["username"] is None


def test_an_agent_hung_at_the_freeze_is_not_asked_for_the_login_user(cloud, domains, work_dir,
                                                                     tiny_guest_image):
    """The guest's qemu-ga is stopped (SIGSTOP, from inside the guest through the agent
    itself): libvirt's freeze waits out its timeout and says "not available for now"; the
    worker is told so and does not ask for the login user (it would wait again)."""
    name = _foreign(domains, work_dir, tiny_guest_image, agent=True)
    stop = {"execute": "guest-exec", "arguments": {
        "path": "/bin/sh", "arg": ["-c", "sleep 0.3; kill -STOP $(pidof qemu-ga)"]}}
    subprocess.run(["virsh", "-q", "-c", "qemu:///system", "qemu-agent-command", name,
                    json.dumps(stop)], check=True, capture_output=True)
    wait_until(lambda: not agent_answers(name), 30, "the guest agent to hang")
    done = cloud("servers", "snapshot", name)
    assert done.exit_code == 0, done.stderr
    assert "could not freeze" in done.stderr and "crash-consistent" in done.stderr
    snapshot = done.stdout.strip()
    record = wait_settled(cloud, snapshot)
    assert (record["state"], record["consistency"], record["username"]) == (
        "available", "crash-consistent", None)
    log = (cloud.data_dir / "logs" / f"{snapshot}.log").read_text()
    assert (f"note: the guest agent of {name} did not answer the freeze: not asked for the "
            "login user") in log
