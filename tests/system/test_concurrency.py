"""8 bbsnap processes at once, for a fixed number of rounds, mixing snapshot, create, destroy,
import, list and show on 3 servers. Every operation is done or refused with a clear error;
no row is lost or duplicated, no "database is locked" reaches a user, no file that is in use
disappears."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from bbsnap.disks import qemu_img
from bbsnap.tinyguest import READY_LINE
from tests.images import MIB, raw_disk
from tests.system.conftest import console_path, create_server, wait_for_console_line, wait_until
from tests.system.reliability_report import read_report, write_report

PROCESSES = 8
ROUNDS = 8
OPERATIONS = ("snapshot", "create", "destroy", "destroy-image", "import", "list", "show")


def test_eight_processes_at_once(cloud, hypervisor, work_dir):
    seed = int(os.environ.get("BBSNAP_FAULT_SEED", time.time()))
    print(f"concurrency seed: {seed}")
    source = raw_disk(work_dir / "small.raw", size=32 * MIB)
    servers = create_server(cloud, "-i", "3")
    for server in servers:
        wait_for_console_line(console_path(cloud, server["id"]), READY_LINE)
    env = {**os.environ, **cloud.env}
    lock = threading.Lock()
    log: list[dict] = []
    made_images: list[str] = [cloud.image_id]
    made_servers: list[str] = []

    def bbsnap(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bbsnap.cli.main", *args], env=env,
                              capture_output=True, text=True, timeout=300)

    def worker(index: int) -> None:
        rng = random.Random(seed + index)
        for _ in range(ROUNDS):
            op = rng.choice(OPERATIONS)
            with lock:
                image = rng.choice(made_images)
                mine = [s for s in made_servers if s.endswith(f"#{index}")]
            if op == "snapshot":
                done = bbsnap("servers", "snapshot", rng.choice(servers)["id"])
            elif op == "create":
                done = bbsnap("servers", "create", image, "--no-start", "--memory", "128", "-s")
            elif op == "destroy" and mine:
                done = bbsnap("servers", "destroy", mine[0].split("#")[0])
            elif op == "import":
                done = bbsnap("images", "import", str(source), "--name", f"p{index}")
            elif op == "destroy-image":
                # Often refused (in use by servers or snapshots): exit 4, named dependents.
                done = bbsnap("images", "destroy", image)
            elif op == "destroy":
                op = "list"  # nothing of this worker's to destroy yet
                done = bbsnap("images", "list", "--format", "json")
            elif op == "show":
                done = bbsnap("images", "show", image, "--format", "json")
            else:
                done = bbsnap("images", "list", "--format", "json")
            with lock:
                log.append({"op": op, "rc": done.returncode, "out": done.stdout,
                            "err": done.stderr})
                if done.returncode == 0 and op in ("snapshot", "import"):
                    made_images.append(done.stdout.strip())
                if done.returncode == 0 and op == "create":
                    made_servers.append(done.stdout.split("\t")[0] + f"#{index}")
                if done.returncode == 0 and op == "destroy":
                    made_servers.remove(mine[0])
                if done.returncode == 0 and op == "destroy-image" and image in made_images:
                    made_images.remove(image)

    failures: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            worker(index)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(PROCESSES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []

    for entry in log:
        assert "database is locked" not in entry["err"] and "Traceback" not in entry["err"]
        assert "internal error" not in entry["err"], entry
        if entry["rc"] != 0:
            assert entry["rc"] in (1, 3, 4), entry
            assert entry["err"].count("bbsnap: error:") == 1, entry

    # Settle the background copies, then check the catalogue against what users were told.
    def settled():
        listing = json.loads(bbsnap("images", "list", "--format", "json").stdout)
        return listing if all(i["state"] != "creating" for i in listing) else None
    listing = wait_until(settled, 240, "the snapshot copies to finish")
    ids = [i["id"] for i in listing]
    assert len(ids) == len(set(ids)), "duplicated rows"
    for image_id in made_images:
        assert image_id in ids, f"{image_id} was reported created but is gone"
    for image in listing:
        if image["state"] == "available":
            path = cloud.data_dir / "images" / f"{image['id']}.qcow2"
            assert path.exists() and qemu_img.check(path, force_share=True).clean
    existing = {s["id"] for s in json.loads(bbsnap("servers", "list", "--format", "json").stdout)}
    for entry in made_servers:
        server_id = entry.split("#")[0]
        assert server_id in existing
        assert Path(cloud.data_dir / "servers" / server_id / "disk.qcow2").exists()

    counts = {op: sum(1 for e in log if e["op"] == op) for op in OPERATIONS}
    report = read_report()
    report["concurrency"] = {"processes": PROCESSES, "operations": len(log), "by_kind": counts,
                             "refused": sum(1 for e in log if e["rc"] != 0), "seed": seed}
    write_report(report)
