"""Faults during a snapshot copy: bbsnap killed, libvirtd restarted, the server destroyed or
shut down, the target disk full, a guest agent that hangs on freeze.

After each: the server runs on an intact chain (or is cleanly stopped), no partial image is
ever available, temporary files are gone and `qemu-img check` is clean on what is left.
To hit the copy mid-way, the server's own disk carries 512 MiB that the guest "wrote" (with
qemu-io before its first start, which its change tracking records like any guest write, so
the snapshot's incremental copy holds them), and the test slows the real QEMU backup job
down through QEMU's own monitor (block-job-set-speed).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from bbsnap.disks import qemu_img
from bbsnap.tinyguest import READY_LINE, read_counter
from tests.system.conftest import (console_path, create_server, image_record,
                                   set_backup_speed, wait_for_console_line, wait_settled,
                                   wait_until, write_into_running_disk)
from tests.system.libvirtd import restart_libvirtd
from tests.system.test_change_tracking import assert_same_disk, paused


def create_busy_servers(cloud, *args: str, written: str = "512M") -> list[dict]:
    """Servers whose disks hold *written* bytes of their own (past the tiny guest's partition),
    started and booted."""
    servers = create_server(cloud, "--no-start", *args)
    for server in servers:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 512M {written}",
                        server["disks"][0]], check=True, capture_output=True)
        assert cloud("servers", "start", server["id"]).exit_code == 0
    for server in servers:
        wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    return servers


def start_slowed_snapshot(cloud, server_id: str) -> str:
    result = cloud.process("servers", "snapshot", server_id)
    assert result.exit_code == 0, result.stderr
    assert len(set_backup_speed(server_id, 1)) == 1, "the copy finished before it could be slowed"
    return result.stdout.strip()


def job_token(cloud, image_id: str) -> str | None:
    with sqlite3.connect(cloud.data_dir / "catalogue.sqlite3") as db:
        return db.execute("SELECT job FROM images WHERE id = ?", (image_id,)).fetchone()[0]


def assert_clean_aftermath(cloud, server: dict, image: dict) -> None:
    assert image["state"] in ("available", "failed")
    assert list((cloud.data_dir / "tmp").iterdir()) == [], "temporary files left behind"
    stored = cloud.data_dir / "images" / f"{image['id']}.qcow2"
    if image["state"] == "failed":
        assert not stored.exists() and image["disk_size"] == 0
    else:
        assert qemu_img.check(stored).clean
    disk = Path(server["disks"][0])
    assert qemu_img.check(disk, force_share=True).corruptions == 0
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(disk)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["backing-filename"].endswith(f"{cloud.image_id}.qcow2"), "the chain is intact"


def test_worker_killed_mid_copy_is_adopted_and_finished(cloud, hypervisor):
    (server,) = create_busy_servers(cloud)
    image_id = start_slowed_snapshot(cloud, server["id"])
    worker = wait_until(lambda: job_token(cloud, image_id), 30, "the worker's token")
    os.kill(int(worker.split(":")[0]), signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{worker.split(':')[0]}").exists(), 30, "the worker to die")

    # The next bbsnap command notices and hands the copy to a new worker.
    assert image_record(cloud, image_id)["state"] == "creating"
    wait_until(lambda: job_token(cloud, image_id) not in (None, worker), 30, "a new worker")
    set_backup_speed(server["id"], 0)
    image = wait_settled(cloud, image_id)
    assert image["state"] == "available", image["failure_reason"]
    assert read_counter(cloud.data_dir / "images" / f"{image_id}.qcow2") is not None
    assert_clean_aftermath(cloud, server, image)


def test_worker_killed_mid_copy_of_a_chained_snapshot_loses_nothing(cloud, hypervisor):
    """The second snapshot of a chain (incremental from the first one's checkpoint), its
    worker SIGKILLed mid-copy: adopted, finished on the first snapshot, exactly the disk at
    its instant (the guest is paused meanwhile), and the chain goes on from it."""
    (server,) = create_busy_servers(cloud, written="32M")
    disk = server["disks"][0]
    first = cloud("servers", "snapshot", server["id"], "--no-quiesce", "--wait")
    assert first.exit_code == 0, first.stderr
    first_id = first.stdout.strip()
    write_into_running_disk(server["id"], "write -P 0x66 768M 256M")
    with paused(server["id"]):
        result = cloud.process("servers", "snapshot", server["id"], "--no-quiesce")
        assert result.exit_code == 0, result.stderr
        image_id = result.stdout.strip()
        (to_copy,) = set_backup_speed(server["id"], 1)
        assert 256 << 20 <= to_copy < 272 << 20, to_copy  # since the first snapshot only
        worker = wait_until(lambda: job_token(cloud, image_id), 30, "the worker's token")
        os.kill(int(worker.split(":")[0]), signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{worker.split(':')[0]}").exists(), 30,
                   "the worker to die")
        assert image_record(cloud, image_id)["state"] == "creating"  # recovery adopts it
        wait_until(lambda: job_token(cloud, image_id) not in (None, worker), 30, "a new worker")
        set_backup_speed(server["id"], 0)
        image = wait_settled(cloud, image_id)
        assert image["state"] == "available", image["failure_reason"]
        assert_same_disk(cloud, image, disk)
    assert image["parent_id"] == first_id
    assert_clean_aftermath(cloud, server, image)
    again = cloud("servers", "snapshot", server["id"], "--no-quiesce", "--wait")
    assert again.exit_code == 0, again.stderr
    assert image_record(cloud, again.stdout.strip())["parent_id"] == image_id


def test_libvirtd_restarted_mid_copy(cloud, hypervisor):
    (server,) = create_busy_servers(cloud)
    image_id = start_slowed_snapshot(cloud, server["id"])
    restart_libvirtd()  # as scripts/setup started it (under tini), not holding the test lock
    hypervisor.close()  # the session's connection died with the daemon; reconnect lazily
    set_backup_speed(server["id"], 0)
    image = wait_settled(cloud, image_id)
    assert image["state"] == "available", image["failure_reason"]
    assert hypervisor.info(server["id"]).state.value == "running"
    assert_clean_aftermath(cloud, server, image)


@pytest.mark.parametrize("how", ["destroy", "shutdown"])
def test_server_destroyed_or_shut_down_mid_copy(cloud, hypervisor, how):
    (server,) = create_busy_servers(cloud)
    image_id = start_slowed_snapshot(cloud, server["id"])
    getattr(hypervisor, how)(server["id"])
    image = wait_settled(cloud, image_id)
    assert image["state"] == "failed" and image["failure_reason"]
    wait_until(lambda: hypervisor.info(server["id"]).state.value == "shutoff", 60,
               "the server to be stopped")
    assert_clean_aftermath(cloud, server, image)
    # The server is intact: it starts again and carries on from its own disk.
    assert cloud("servers", "start", server["id"]).exit_code == 0
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)


def test_target_disk_full(cloud, hypervisor):
    (server,) = create_server(cloud, "--no-start")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 512M 32M",
                    server["disks"][0]], check=True, capture_output=True)
    tmp = cloud.data_dir / "tmp"
    # The copy's target directory on a filesystem too small for the copy (32 MiB of writes),
    # mounted before QEMU starts: QEMU runs in its own mount namespace, made when it starts.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(tmp)],
                   check=True)
    try:
        assert cloud("servers", "start", server["id"]).exit_code == 0
        wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
        result = cloud("servers", "snapshot", server["id"], "--wait")
        assert result.exit_code == 1 and "failed" in result.stderr, result.stderr
        image = image_record(cloud, result.stdout.strip())
        assert image["state"] == "failed"
        assert list(tmp.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(tmp)], check=True)
    assert hypervisor.info(server["id"]).state.value == "running"
    disk = server["disks"][0]
    before = read_counter(Path(disk))
    wait_until(lambda: read_counter(Path(disk)) > before, 60, "the guest to keep counting")
    assert_clean_aftermath(cloud, server, image)


def test_guest_agent_hanging_on_freeze(cloud, hypervisor, work_dir):
    key = work_dir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (server,) = create_server(cloud, "--ssh-key", f"{key}.pub")
    wait_for_console_line(console_path(cloud, server["id"]), "BBSNAP-SSH started")
    stopped = cloud.process("servers", "ssh", server["id"], "-i", str(key), "--",
                            "kill -STOP $(pidof qemu-ga)")
    assert stopped.exit_code == 0, stopped.stderr

    result = cloud.process("servers", "snapshot", server["id"], "--wait", timeout=120)
    assert result.exit_code == 0, result.stderr
    assert "crash-consistent" in result.stderr
    image = image_record(cloud, result.stdout.strip())
    assert image["consistency"] == "crash-consistent" and image["state"] == "available"
    disk = Path(server["disks"][0])
    before = read_counter(disk)
    wait_until(lambda: read_counter(disk) > before, 60, "the guest to keep counting (not frozen)")
    assert_clean_aftermath(cloud, server, image)


def test_operations_on_one_server_wait_for_its_copy_and_other_servers_do_not(cloud, hypervisor):
    first, second = create_busy_servers(cloud, "-i", "2", written="256M")
    slow = start_slowed_snapshot(cloud, first["id"])

    # Another server is not held up by the first one's copy.
    other = cloud.process("servers", "snapshot", second["id"], "--wait", timeout=120)
    assert other.exit_code == 0, other.stderr
    assert image_record(cloud, slow)["state"] == "creating"

    # The same server: the second snapshot waits for the first copy to finish.
    env = {**os.environ, **cloud.env}
    waiting = subprocess.Popen(
        ["python3", "-m", "bbsnap.cli.main", "servers", "snapshot", first["id"], "--wait"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = waiting.stderr.readline() + waiting.stderr.readline()
        assert "waiting for another operation" in line
        assert waiting.poll() is None and image_record(cloud, slow)["state"] == "creating"
        set_backup_speed(first["id"], 0)
        out, err = waiting.communicate(timeout=180)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    assert wait_settled(cloud, slow)["state"] == "available"
    assert image_record(cloud, out.strip())["state"] == "available"


def test_a_copy_under_way_shows_how_far_it_has_got(cloud, hypervisor):
    (server,) = create_busy_servers(cloud, written="256M")
    image_id = start_slowed_snapshot(cloud, server["id"])
    wait_until(lambda: image_record(cloud, image_id)["progress"] is not None, 30,
               "the worker to report the copy's progress")
    held = image_record(cloud, image_id)["progress"]  # the job is held: it stays there
    assert 0 <= held < 99
    shown = cloud("images", "show", image_id)
    assert shown.exit_code == 0 and f"progress: {held}%" in shown.stdout, shown.stdout

    # Let the rest of the copy take a few seconds, and watch the figure move.
    (total,) = set_backup_speed(server["id"], 1)
    set_backup_speed(server["id"], max(total * (100 - held) // 100 // 4, 1 << 20))
    wait_until(lambda: (image_record(cloud, image_id)["progress"] or -1) > held, 60,
               "the progress to move on")
    set_backup_speed(server["id"], 0)
    done = wait_settled(cloud, image_id)
    assert done["state"] == "available" and done["progress"] is None
    assert "progress" not in cloud("images", "show", image_id).stdout
