#!/usr/bin/env python3
"""Benchmark: a snapshot's cost follows what changed since the previous one, not the history.

On running tiny guests (TCG, 128 MiB), in one run (needs libvirtd):
  - a bbsnap server whose disk already holds 1 GiB written since it was created (and
    snapshotted once), against a fresh server (snapshotted once): each then gets 64 MiB of
    new writes and a snapshot, timed until the image is available (goal <= 1.2x);
  - the same for domains bbsnap did not create (plain libvirt XML, a standalone qcow2 disk):
    one whose disk holds 1 GiB, one that holds only the guest, both after their first (full)
    snapshot, which starts the checkpoint chain (goal <= 1.2x).
The writes go through the guest's own block backend (QEMU's qemu-io on the device), so the
dirty bitmaps see them as guest writes. Each figure is the median of several snapshots, each
after its own 64 MiB. One guest runs at a time (each is powered off once measured), so two TCG
guests never share the two cores during a measured copy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchlib import BBSNAP, cli_runner, guest_env, bench_dir

RUNS = 5
GOAL = 1.2
URI = "qemu:///system"
CHUNK_MIB = 64
HISTORY_MIB = 1024


def main() -> None:
    from bbsnap.hypervisor import DiskSpec, DomainSpec
    from bbsnap.hypervisor.domain_xml import build_domain_xml
    from bbsnap.tinyguest import READY_LINE, build_tiny_guest

    work = bench_dir()
    env = guest_env(work, LIBVIRT_DEFAULT_URI=URI)
    bbsnap = BBSNAP
    foreign: list[str] = []
    servers: list[str] = []
    run = cli_runner(env)

    def virsh(*args: str) -> str:
        return subprocess.run(["virsh", "-q", "-c", URI, *args], check=True,
                              capture_output=True, text=True).stdout

    def wait_booted(console: Path, who: str) -> None:
        deadline = time.monotonic() + 240
        while READY_LINE not in (console.read_text(errors="replace") if console.exists() else ""):
            if time.monotonic() > deadline:
                raise SystemExit(f"{who} did not boot")
            time.sleep(0.2)

    def write(domain: str, offset_mib: int, length_mib: int) -> None:
        """Guest-path writes through the device's block backend (no guest cooperation)."""
        for start in range(offset_mib, offset_mib + length_mib, 256):
            size = min(256, offset_mib + length_mib - start)
            out = virsh("qemu-monitor-command", domain, "--hmp",
                        f'qemu-io -d virtio-disk0/virtio-backend "write -P 0x6b {start}M {size}M"')
            if out.strip():
                raise SystemExit(f"write into {domain} failed: {out.strip()}")

    def snapshot_until_available(domain: str) -> float:
        start = time.perf_counter()
        image = run("servers", "snapshot", domain, "--no-quiesce", "--wait")
        elapsed = time.perf_counter() - start
        state = json.loads(run("images", "show", image.splitlines()[0], "--format", "json"))
        if state["state"] != "available":
            raise SystemExit(f"snapshot of {domain} is {state['state']}")
        return elapsed

    def timed_chain(domain: str, first_free_mib: int) -> float:
        """Median time of RUNS snapshots, each after CHUNK_MIB of new writes."""
        samples = []
        for index in range(RUNS):
            write(domain, first_free_mib + index * CHUNK_MIB, CHUNK_MIB)
            samples.append(snapshot_until_available(domain))
        return sorted(samples)[len(samples) // 2]

    def bbsnap_server(image: str, history_mib: int) -> str:
        server = json.loads(run("servers", "create", image, "--memory", "128", "--disk-size", "4",
                                "--format", "json"))[0]["id"]
        servers.append(server)
        wait_booted(work / "data" / "servers" / server / "console.log", server)
        if history_mib:
            write(server, 256, history_mib)
        snapshot_until_available(server)
        return server

    def foreign_domain(disk: Path, history_mib: int) -> str:
        domain = f"bbsnap-bench-history-{uuid.uuid4().hex[:6]}"
        subprocess.run(["qemu-img", "resize", "-q", str(disk), "4G"], check=True)
        if history_mib:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 256M {history_mib}M",
                            str(disk)], check=True, capture_output=True)
        xml = work / f"{domain}.xml"
        xml.write_text(build_domain_xml(DomainSpec(
            name=domain, uuid=str(uuid.uuid4()), memory_mib=128, vcpus=1, accel="tcg",
            disks=(DiskSpec(disk),), console_log=work / f"{domain}.log")))
        virsh("define", str(xml))
        foreign.append(domain)
        virsh("start", domain)
        wait_booted(work / f"{domain}.log", domain)
        snapshot_until_available(domain)  # the full first copy, which starts the chain
        return domain

    def stop(domain: str) -> None:
        subprocess.run(["virsh", "-q", "-c", URI, "destroy", domain], check=False,
                       capture_output=True)

    figures: dict[str, float] = {}
    try:
        print("preparing the tiny guest ...", file=sys.stderr)
        guest = build_tiny_guest()
        image = run("images", "import", str(guest), "--name", "tiny")
        free = 256 + HISTORY_MIB  # past the history's writes, inside the 4 GiB disk

        for label, history in (("fresh", 0), ("history", HISTORY_MIB)):
            print(f"bbsnap server, {label} ...", file=sys.stderr)
            server = bbsnap_server(image, history)
            figures[f"server {label}"] = timed_chain(server, free)
            run("servers", "stop", server, "--force")

        for label, history in (("fresh", 0), ("history", HISTORY_MIB)):
            print(f"other domain, {label} ...", file=sys.stderr)
            disk = work / f"foreign-{label}.qcow2"
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(guest), str(disk)], check=True)
            domain = foreign_domain(disk, history)
            figures[f"foreign {label}"] = timed_chain(domain, free)
            stop(domain)
    finally:
        for server in servers:
            subprocess.run([*bbsnap, "servers", "destroy", server], env=env, check=False,
                           capture_output=True)
        for domain in foreign:
            stop(domain)
            subprocess.run(["virsh", "-q", "-c", URI, "undefine", domain, "--checkpoints-metadata"],
                           check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'measurement (tiny guest, TCG, 128 MiB, running)':62} {'median':>9}  ratio / goal")
    for kind, what in (("server", "bbsnap server"), ("foreign", "domain bbsnap did not make")):
        fresh, history = figures[f"{kind} fresh"], figures[f"{kind} history"]
        ratio = history / fresh
        print(f"{what + ': 64 MiB snapshot, fresh disk':62} {fresh * 1000:7.1f}ms  1.00")
        print(f"{what + ': 64 MiB snapshot, 1 GiB history':62} {history * 1000:7.1f}ms  {ratio:.2f} "
              f"vs fresh (goal <= {GOAL:g}: {'met' if ratio <= GOAL else 'MISSED'})")


if __name__ == "__main__":
    main()
