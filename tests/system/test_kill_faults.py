"""SIGKILL at random points of import, live snapshot (command and background worker),
export and server create; after each, the next bbsnap command recovers and nothing is lost.

Checked after every kill: no image stays `creating`; every available image has its files and
`qemu-img check` is clean; every server's disk chain resolves; no temporary or partial file
is left (the doctor finds no orphan). The seed is printed so a failure can be replayed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


from bbsnap.state.catalogue import Catalogue
from bbsnap.config import load_settings
from bbsnap.disks import qemu_img
from bbsnap.state.layout import DataDir
from bbsnap.services.doctor import Doctor
from bbsnap.tinyguest import READY_LINE
from tests.images import MIB, raw_disk
from tests.system.conftest import URI, console_path, create_server, wait_for_console_line, wait_until
from tests.system.reliability_report import write_report

KILLS_PER_OPERATION = 6  # x 4 operations = 24 kills
OPERATIONS = ("import", "snapshot", "export", "create")


def spawn(cloud, *args: str) -> subprocess.Popen:
    env = {**os.environ, **cloud.env}
    return subprocess.Popen([sys.executable, "-m", "bbsnap.cli.main", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def kill_group(child: subprocess.Popen) -> bool:
    """SIGKILL the command and its helpers (qemu-img ...); True if it was still running."""
    alive = child.poll() is None
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
    return alive


def workers(cloud) -> list[int]:
    with sqlite3.connect(cloud.data_dir / "catalogue.sqlite3") as db:
        tokens = [row[0] for row in db.execute("SELECT job FROM images WHERE status='creating'")]
    return [int(t.split(":")[0]) for t in tokens if t]


def check_invariants(cloud, export_dir: Path) -> None:
    def settled():
        result = cloud("images", "list", "--format", "json")  # runs crash recovery
        assert result.exit_code == 0, result.stderr
        return all(i["state"] != "creating" for i in json.loads(result.stdout))
    wait_until(settled, 180, "every image to leave creating")
    catalogue = Catalogue(cloud.data_dir / "catalogue.sqlite3")
    try:
        for image in json.loads(cloud("images", "list", "--format", "json").stdout):
            if image["state"] != "available":
                continue
            files = [cloud.data_dir / "images" / f"{image['id']}.qcow2"]
            files += [cloud.data_dir / "images" / v.path for v in catalogue.volumes(image["id"])]
            for path in files:
                assert path.exists(), f"available image {image['id']} lost {path}"
                assert qemu_img.check(path, force_share=True).clean, f"{path} fails check"
        for server in json.loads(cloud("servers", "list", "--format", "json").stdout):
            for disk in server["disks"]:
                subprocess.run(["qemu-img", "info", "-U", "--backing-chain", disk], check=True,
                               capture_output=True)
        settings = load_settings({"data_dir": str(cloud.data_dir)}, environ={"BBSNAP_CONFIG": ""})
        from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor
        hv = LibvirtHypervisor(URI)
        orphans = Doctor(settings, DataDir(cloud.data_dir), catalogue, lambda: hv).orphans()
        hv.close()
        assert orphans == [], f"left behind: {[str(o.path) for o in orphans]}"
        assert list(export_dir.glob("*.partial")) == [], "a partial export was left"
    finally:
        catalogue.close()


def test_sigkill_at_random_points(cloud, hypervisor, work_dir):
    seed = int(os.environ.get("BBSNAP_FAULT_SEED", time.time()))
    print(f"fault-injection seed: {seed} (BBSNAP_FAULT_SEED={seed} replays it)")
    rng = random.Random(seed)
    source = work_dir / "source.raw.gz"
    subprocess.run(["gzip", "-1", "-c", str(raw_disk(work_dir / "s.raw", size=256 * MIB))],
                   stdout=open(source, "wb"), check=True)
    (server,) = create_server(cloud)
    wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    export_dir = work_dir / "exports"
    export_dir.mkdir()
    report = {op: {"kills": 0, "killed_while_running": 0, "workers_killed": 0} for op in OPERATIONS}

    def command(op: str, n: int) -> tuple[str, ...]:
        return {
            "import": ("images", "import", str(source), "--name", f"kill {n}"),
            "snapshot": ("servers", "snapshot", server["id"]),
            "export": ("images", "export", cloud.image_id, "-o", str(export_dir / f"x{n}.gz")),
            "create": ("servers", "create", cloud.image_id, "--no-start", "--memory", "128"),
        }[op]

    # Calibrate: how long each operation runs undisturbed bounds where its kills land.
    windows = {}
    for op in OPERATIONS:
        start = time.monotonic()
        assert spawn(cloud, *command(op, -1)).wait() == 0
        windows[op] = time.monotonic() - start
    check_invariants(cloud, export_dir)

    plan = [op for op in OPERATIONS for _ in range(KILLS_PER_OPERATION)]
    rng.shuffle(plan)
    for round_number, op in enumerate(plan):
        child = spawn(cloud, *command(op, round_number))
        kill_worker_instead = op == "snapshot" and rng.random() < 0.5
        if kill_worker_instead:
            child.wait()  # the command returned; kill its background copy at a random point
            time.sleep(rng.uniform(0, 0.3))
            for pid in workers(cloud):
                try:
                    os.kill(pid, signal.SIGKILL)
                    report[op]["workers_killed"] += 1
                except ProcessLookupError:
                    pass
        else:
            time.sleep(rng.uniform(0, windows[op]))
            report[op]["killed_while_running"] += int(kill_group(child))
        report[op]["kills"] += 1
        check_invariants(cloud, export_dir)

    total = sum(r["kills"] for r in report.values())
    assert total >= 20
    write_report({"seed": seed, "kills": total, "by_operation": report, "windows_s": windows})
    for srv in json.loads(cloud("servers", "list", "--format", "json").stdout):
        if str(cloud.data_dir) in "".join(srv["disks"]):
            assert cloud("servers", "destroy", srv["id"]).exit_code == 0
