#!/usr/bin/env python3
"""Benchmark: what asking the guest agent for the login user adds to a snapshot's latency
(nothing since the eleventh session: the snapshot's worker asks while QEMU copies).

In one run (needs libvirtd; the tiny guest is built if needed), on one running domain bbsnap
did not create (the tiny guest, with its real qemu-ga), alternating the two on the same guest:
  - `servers snapshot --username tiny`: the baseline, no question to the agent;
  - `servers snapshot` without a user: the agent is asked who is logged in
    (services/snapshots/login_user.py).
Latency is until the call returns (the point in time fixed), through bbsnap's API in this
process, each image waited for and destroyed before the next. Goal: the question adds at most
10% (ratio <= 1.1). The question is bounded by login_user.AGENT_TIMEOUT for a silent agent.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchlib import bench_dir, cli_runner, guest_env

RUNS = 7
URI = "qemu:///system"


def main() -> None:
    from bbsnap.cli.context import AppContext
    from bbsnap.hypervisor import DiskSpec, DomainSpec
    from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor
    from bbsnap.services.snapshots.start import SnapshotRequest
    from bbsnap.state.catalogue import Catalogue
    from bbsnap.tinyguest import READY_LINE, build_tiny_guest

    work = bench_dir()
    env = guest_env(work, LIBVIRT_DEFAULT_URI=URI)
    os.environ.update(env)
    run = cli_runner(env)
    hv = LibvirtHypervisor(URI)
    domain = f"bbsnap-bench-login-{uuid.uuid4().hex[:6]}"
    try:
        disk = work / "vm.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(build_tiny_guest()),
                        str(disk)], check=True)
        log = work / "console.log"
        hv.define(DomainSpec(name=domain, uuid=str(uuid.uuid4()), memory_mib=128, vcpus=1,
                             accel="tcg", disks=(DiskSpec(disk),), console_log=log,
                             guest_agent=True))
        hv.start(domain)
        deadline = time.monotonic() + 240
        while READY_LINE not in (log.read_text(errors="replace") if log.exists() else ""):
            if time.monotonic() > deadline:
                raise SystemExit(f"{domain} did not boot")
            time.sleep(0.2)
        while True:  # the agent's channel connects a little after qemu-ga starts
            try:
                hv.logged_in_users(domain, 2)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{domain}'s guest agent does not answer") from None
                time.sleep(0.2)

        service = AppContext(overrides={}).snapshots()

        def settle_and_destroy(image_id: str) -> str | None:
            """The login user the settled image records (the worker's to ask)."""
            catalogue = Catalogue(work / "data" / "catalogue.sqlite3")
            try:
                while catalogue.get(image_id, include_deleted=True).status.value == "creating":
                    time.sleep(0.01)
                username = catalogue.get(image_id, include_deleted=True).username
            finally:
                catalogue.close()
            run("images", "destroy", image_id)
            return username

        samples: dict[str, list[float]] = {"given": [], "asked": []}
        recorded = set()
        for _ in range(RUNS):
            for kind in ("given", "asked"):
                request = SnapshotRequest(server=domain,
                                          username="tiny" if kind == "given" else None)
                start = time.perf_counter()
                image = service.begin(request)
                samples[kind].append(time.perf_counter() - start)
                recorded.add((kind, settle_and_destroy(image.id)))
    finally:
        try:
            hv.destroy(domain)
            hv.undefine(domain)
        except Exception:
            pass
        hv.close()
        shutil.rmtree(work, ignore_errors=True)

    if recorded != {("given", "tiny"), ("asked", "tiny")}:
        raise SystemExit(f"unexpected login users recorded: {sorted(recorded)}")
    given, asked = (statistics.median(samples[k]) for k in ("given", "asked"))
    ratio = asked / given
    print(f"{'measurement':52} {'median':>9}  ratio / goal")
    print(f"{'snapshot latency, --username given (baseline)':52} {given * 1000:7.1f}ms  1.00")
    print(f"{'snapshot latency, login user asked of the agent':52} {asked * 1000:7.1f}ms  "
          f"{ratio:.2f} (goal <= 1.1: {'met' if ratio <= 1.1 else 'MISSED'})")


if __name__ == "__main__":
    main()
