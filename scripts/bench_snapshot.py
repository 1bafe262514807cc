#!/usr/bin/env python3
"""Benchmark: live snapshot latency and time until available, on the same running guests.

In one run (needs libvirtd; the tiny guest is built if needed):
  1. `bbsnap servers snapshot` latency (until the command returns, the point in time fixed)
     against `virsh snapshot-create-as --disk-only --atomic --no-metadata` on the same guest
     (printed; that goal is retired for the one against `--quiesce`, the same work, which
     bench_guest_view, run at the end, measures);
  2. that latency on a guest with a 64 MiB disk against one with an 8 GiB-virtual disk
     holding ~1 GiB (goal ratio <= 1.5);
  3. time until the image is available against `qemu-img convert -W` of the same disk
     (goal <= 1.5x), for a server bbsnap made from a catalogue image holding 1 GiB (only the
     guest's writes are copied) and for a domain bbsnap did not make (its whole disk is).
Latencies are also given for the operation alone (bbsnap's API in this process), and the
floor under any Python command: the interpreter's start-up and `import libvirt`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchlib import bench_dir, median_time

RUNS = 5
URI = "qemu:///system"


def main() -> None:
    from bbsnap.hypervisor import DiskSpec, DomainSpec
    from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor
    from bbsnap.tinyguest import READY_LINE, build_tiny_guest

    work = bench_dir()
    env = {**os.environ, "BBSNAP_HOME": str(work / "data"), "BBSNAP_CONFIG": "",
           "BBSNAP_ACCEL": "tcg", "LIBVIRT_DEFAULT_URI": URI}
    os.environ.update(env)
    bbsnap = [sys.executable, "-m", "bbsnap.cli.main"]
    hv = LibvirtHypervisor(URI)
    domains: list[str] = []

    def run(*args: str) -> str:
        return subprocess.run([*bbsnap, *args], env=env, check=True, capture_output=True,
                              text=True).stdout.strip()

    def boot(name: str, disk: Path) -> str:
        domain = f"bbsnap-bench-{name}-{uuid.uuid4().hex[:6]}"
        log = work / f"{domain}.log"
        hv.define(DomainSpec(name=domain, uuid=str(uuid.uuid4()), memory_mib=128, vcpus=1,
                             accel="tcg", disks=(DiskSpec(disk),), console_log=log))
        domains.append(domain)
        hv.start(domain)
        deadline = time.monotonic() + 240
        while READY_LINE not in (log.read_text(errors="replace") if log.exists() else ""):
            if time.monotonic() > deadline:
                raise SystemExit(f"{domain} did not boot")
            time.sleep(0.2)
        return domain

    def wait_available(image_id: str) -> None:
        """Poll the catalogue in this process (a CLI call per poll would blur the figure)."""
        from bbsnap.state.catalogue import Catalogue

        catalogue = Catalogue(work / "data" / "catalogue.sqlite3")
        try:
            while True:
                state = catalogue.get(image_id, include_deleted=True).status.value
                if state != "creating":
                    if state != "available":
                        raise SystemExit(f"{image_id} is {state}")
                    return
                time.sleep(0.01)
        finally:
            catalogue.close()

    try:
        guest = build_tiny_guest()
        small_disk = work / "small.qcow2"
        big_disk = work / "big.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(guest), str(small_disk)], check=True)
        shutil.copy(small_disk, big_disk)
        # The tiny guest's disk is 128 MiB; it boots from 64 MiB too (the kernel truncates
        # the partition, whose files all lie in the first ~21 MiB).
        subprocess.run(["qemu-img", "resize", "-q", "--shrink", str(small_disk), "64M"], check=True)
        subprocess.run(["qemu-img", "resize", "-q", str(big_disk), "8G"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1G 1G", str(big_disk)],
                       check=True, capture_output=True)
        small, big = boot("small", small_disk), boot("big", big_disk)

        def bbsnap_snapshot(domain: str) -> str:
            return run("servers", "snapshot", domain)

        images: list[str] = []
        cli = {}
        for domain in (small, big):
            cli[domain] = median_time(lambda d=domain: images.append(bbsnap_snapshot(d)), RUNS,
                                      lambda: (wait_available(images[-1]),
                                               run("images", "destroy", images.pop())))

        def virsh_snapshot(domain: str) -> None:
            subprocess.run(["virsh", "-q", "-c", URI, "snapshot-create-as", domain,
                            "--disk-only", "--atomic", "--no-metadata"], check=True,
                           capture_output=True)

        def virsh_undo(domain: str) -> None:
            overlay = hv.disks(domain)[0].path
            subprocess.run(["virsh", "-q", "-c", URI, "blockcommit", domain, "vda", "--active",
                            "--pivot", "--wait"], check=True, capture_output=True)
            Path(overlay).unlink(missing_ok=True)

        virsh_time = median_time(lambda: virsh_snapshot(small), RUNS, lambda: virsh_undo(small))

        # The floor under any Python command that snapshots through libvirt-python: start the
        # interpreter (with this installation's site-packages) and import libvirt.
        def python(code: str) -> None:
            subprocess.run([sys.executable, "-c", code], check=True)

        floor = {"start": median_time(lambda: python("pass"), RUNS),
                 "libvirt": median_time(lambda: python("import libvirt"), RUNS)}

        from bbsnap.cli.context import AppContext
        from bbsnap.services.snapshots.start import SnapshotRequest

        app = AppContext(overrides={})
        service = app.snapshots()
        api = {}
        for domain in (small, big):
            api[domain] = median_time(
                lambda d=domain: images.append(service.begin(SnapshotRequest(server=d)).id),
                RUNS, lambda: (wait_available(images[-1]), run("images", "destroy", images.pop())))

        copy = work / "copy.qcow2"

        def forget_last() -> None:
            from bbsnap.state.catalogue import Catalogue

            catalogue = Catalogue(work / "data" / "catalogue.sqlite3")
            newest = catalogue.find()[-1].id
            catalogue.close()
            run("images", "destroy", newest)

        def until_available_vs_convert(server: str, disk: Path) -> tuple[float, float]:
            """Interleaved, so both see the same page cache and machine load."""
            def convert() -> None:
                subprocess.run(["qemu-img", "convert", "-U", "-W", "-O", "qcow2", str(disk),
                                str(copy)], check=True)

            until_samples, convert_samples = [], []
            for _ in range(3):
                until_samples.append(median_time(lambda: wait_available(bbsnap_snapshot(server)),
                                                 1, forget_last))
                convert_samples.append(median_time(convert, 1, lambda: copy.unlink()))
            return sorted(until_samples)[1], sorted(convert_samples)[1]

        hv.destroy(small)  # two TCG guests on two cores would starve the copy of CPU time
        foreign = until_available_vs_convert(big, big_disk)
        hv.destroy(big)

        # bbsnap's own server, on a catalogue image holding the same 1 GiB: its snapshot
        # copies only what the guest wrote (services/snapshots/change_tracking.py).
        ancestor = run("images", "import", str(big_disk), "--name", "bench-1g")
        server = json.loads(run("servers", "create", ancestor, "--memory", "128",
                                "--format", "json"))[0]
        domains.append(server["id"])
        console = work / "data" / "servers" / server["id"] / "console.log"
        deadline = time.monotonic() + 240
        while READY_LINE not in (console.read_text(errors="replace") if console.exists() else ""):
            if time.monotonic() > deadline:
                raise SystemExit(f"{server['id']} did not boot")
            time.sleep(0.2)
        own = until_available_vs_convert(server["id"], Path(server["disks"][0]))
    finally:
        for domain in domains:
            try:
                hv.destroy(domain)
                hv.undefine(domain)
            except Exception:
                pass
        hv.close()
        shutil.rmtree(work, ignore_errors=True)

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print(f"{'measurement':58} {'median':>9}  ratio / goal")
    print(f"{'virsh snapshot-create-as --disk-only (64 MiB disk)':58} {virsh_time * 1000:7.1f}ms  1.00")
    for label, times in (("CLI", cli), ("API", api)):
        s, b = times[small], times[big]
        print(f"{'bbsnap snapshot latency (' + label + '), 64 MiB disk':58} {s * 1000:7.1f}ms  "
              f"{s / virsh_time:.2f} vs virsh (goal retired: vs --quiesce below)")
        print(f"{'bbsnap snapshot latency (' + label + '), 8 GiB disk, 1 GiB data':58} "
              f"{b * 1000:7.1f}ms  {b / s:.2f} vs 64 MiB (goal <= 1.5: {verdict(b / s <= 1.5)})")
    print(f"{'  floor: python3 start-up':58} {floor['start'] * 1000:7.1f}ms  "
          f"{floor['start'] / virsh_time:.2f} vs virsh")
    print(f"{'  floor: python3 start-up + import libvirt':58} {floor['libvirt'] * 1000:7.1f}ms  "
          f"{floor['libvirt'] / virsh_time:.2f} vs virsh")
    for label, (until, converted) in (("bbsnap server on a 1 GiB image", own),
                                      ("other domain, standalone disk", foreign)):
        print(f"{'qemu-img convert -W of its disk (' + label + ')':58} "
              f"{converted * 1000:7.1f}ms  1.00")
        print(f"{'  snapshot until available':58} {until * 1000:7.1f}ms  {until / converted:.2f} "
              f"vs convert (goal <= 1.5: {verdict(until / converted <= 1.5)})")

    # The guest's view and the CLI against quiescing virsh, on guests of their own.
    import bench_guest_view
    bench_guest_view.main()


if __name__ == "__main__":
    main()
