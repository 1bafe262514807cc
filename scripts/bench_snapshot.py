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
     (goal <= 1.5x) for a server bbsnap made from a catalogue image holding 1 GiB (only the
     guest's writes are copied);
  4. full copies (issue #15): a domain bbsnap did not make, whose standalone disk is copied
     whole, on the 64 MiB disk and on the 8 GiB-virtual / 1 GiB-data one: time until
     available against `qemu-img convert -W -O qcow2` of the same disk followed by an fsync
     of its output (goal <= 1.3x; the ratio to convert alone, which leaves its output in the
     page cache, is printed too), and where the time goes: the command, the worker's start,
     QEMU's job (as libvirt timed it), the worker's steps after it (from the timeline each
     worker writes into its log, services/snapshots/timeline.py).
Latencies are also given for the operation alone (bbsnap's API in this process), and the
floor under any Python command: the interpreter's start-up and `import libvirt`.

`--full-copy` runs part 4 alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchlib import BBSNAP, PYTHON, bench_dir, cli_env, command_server, compile_checkout, median_time

from bbsnap.services.snapshots.timeline import COMMAND_PREFIX, PREFIX, Timeline

RUNS = 5
FULL_COPY_SAMPLES = 5  # interleaved pairs (snapshot, convert) per disk size
URI = "qemu:///system"

# The breakdown of a full copy's time until available: (label, from mark, to mark), the
# marks of the worker's timeline plus "command" (the command started) and "returned".
STEPS = (
    ("command, until it returned", "command", "returned"),
    ("worker forked (from the command's start)", "command", "worker-started"),
    ("worker: imports (none left after the fork)", "worker-started", "imported"),
    ("worker: settings, catalogue opened", "imported", "ready"),
    ("worker: claimed; thaw and login user sent beside the copy", "ready", "login-user"),
    ("worker: waiting for QEMU's job (the connection in one of these two)", "login-user",
     "copied"),
    ("worker: the job's outcome", "copied", "outcome"),
    ("worker: the copy's header read (was qemu-img check)", "outcome", "checked-vda"),
    ("worker: fsync and rename into images/", "checked-vda", "published-vda"),
    ("worker: its sizes (was qemu-img info)", "published-vda", "measured-vda"),
    ("worker: catalogue: available", "measured-vda", "available"),
    ("bench: seen available", "available", "seen"),
)

# The command's latency, step by step: each mark of its timeline (services/snapshots/
# timeline.py COMMAND, written into the image's log) against the one before it; "command"
# is when the benchmark started it, "returned" when it saw it exit.
COMMAND_STEPS = (
    ("parsed", "python3 start-up, site, CLI imports, click parse"),
    ("imported", "snapshot service modules imported"),
    ("service", "catalogue opened, crash recovery, service built"),
    ("access-checked", "QEMU's access to the data directory checked"),
    ("looked-up", "import libvirt, connect, look the domain up"),
    ("locked", "server lock taken"),
    ("read", "domain state and XML read again under the lock"),
    ("planned", "copy planned (chain, ancestor, ids)"),
    ("registered", "catalogue: image added as creating (commit)"),
    ("targets", "backup targets made (copies of a blank template)"),
    ("frozen", "guest agent: freeze"),
    ("backup-begun", "backupBegin (the instant is fixed)"),
    ("thawed", "guest agent: thaw"),
    ("put-aside", "libvirt and catalogue connections closed"),
    ("forked", "worker forked"),
    ("recorded", "catalogue: consistency, worker, login user (commit)"),
    ("returned", "exit, seen by the benchmark"),
)


def command_steps(started: float, returned: float, found: Timeline | None) -> dict[str, float]:
    """Seconds per COMMAND_STEPS label, each from the previous mark present."""
    marks = {"command": started, **dict(found.marks if found else []), "returned": returned}
    steps, previous = {}, started
    for label, _ in COMMAND_STEPS:
        if label in marks:
            steps[label] = marks[label] - previous
            previous = marks[label]
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-copy", action="store_true", help="only the full-copy figures")
    only_full_copy = parser.parse_args().full_copy
    from bbsnap.hypervisor import DiskSpec, DomainSpec
    from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor
    from bbsnap.state.catalogue import Catalogue
    from bbsnap.tinyguest import READY_LINE, build_tiny_guest

    work = bench_dir()
    env = cli_env(BBSNAP_HOME=str(work / "data"), BBSNAP_CONFIG="", BBSNAP_ACCEL="tcg",
                  LIBVIRT_DEFAULT_URI=URI)
    os.environ.update({k: v for k, v in env.items() if k != "PYTHONPATH"})
    compile_checkout()
    bbsnap = BBSNAP
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

    def stop(domain: str) -> None:
        hv.destroy(domain)
        hv.undefine(domain)
        domains.remove(domain)

    def wait_available(image_id: str) -> None:
        """Poll the catalogue in this process (a CLI call per poll would blur the figure)."""
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

    def bbsnap_snapshot(domain: str) -> str:
        return run("servers", "snapshot", domain)

    def forget_last() -> None:
        catalogue = Catalogue(work / "data" / "catalogue.sqlite3")
        newest = catalogue.find()[-1].id
        catalogue.close()
        run("images", "destroy", newest)

    copy = work / "copy.qcow2"

    def convert(disk: Path) -> float:
        start = time.perf_counter()
        subprocess.run(["qemu-img", "convert", "-U", "-W", "-O", "qcow2", str(disk), str(copy)],
                       check=True)
        return time.perf_counter() - start

    def fsync(path: Path) -> float:
        start = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return time.perf_counter() - start

    def until_available_vs_convert(server: str, disk: Path) -> tuple[float, float]:
        """Interleaved, so both see the same page cache and machine load."""
        until_samples, convert_samples = [], []
        for _ in range(3):
            until_samples.append(median_time(lambda: wait_available(bbsnap_snapshot(server)),
                                             1, forget_last))
            convert_samples.append(median_time(lambda: convert(disk), 1, lambda: copy.unlink()))
        return sorted(until_samples)[1], sorted(convert_samples)[1]

    def full_copy(domain: str, disk: Path) -> dict[str, object]:
        """Interleaved pairs: a snapshot of *domain* until available (with the worker's
        timeline), then `qemu-img convert` of its disk and the fsync of that copy."""
        sync_all()  # nobody else's dirty pages in the first sample's fsyncs
        until, converted, synced, job, steps = [], [], [], [], {label: [] for label, *_ in STEPS}
        served: list[float] = []
        latency: dict[str, list[float]] = {label: [] for label, _ in COMMAND_STEPS}
        for _ in range(FULL_COPY_SAMPLES):
            # The same snapshot through a command server (`command-server start`) first.
            with command_server(env, work) as through_server:
                started = time.time()
                image_id = through_server("servers", "snapshot", domain)
                wait_available(image_id)
                served.append(time.time() - started)
                run("images", "destroy", image_id)
                sync_all()
            started = time.time()
            image_id = bbsnap_snapshot(domain)
            returned = time.time()
            wait_available(image_id)
            seen = time.time()
            until.append(seen - started)
            found = worker_timeline(work / "data" / "logs" / f"{image_id}.log")
            ran = worker_timeline(work / "data" / "logs" / f"{image_id}.log", COMMAND_PREFIX)
            for label, seconds in command_steps(started, returned, ran).items():
                latency[label].append(seconds)
            marks = {"command": started, "returned": returned, "seen": seen,
                     **dict(found.marks if found else [])}
            for label, since, to in STEPS:
                if since in marks and to in marks:
                    steps[label].append(marks[to] - marks[since])
            if found and "job" in found.durations:
                job.append(found.durations["job"])
            run("images", "destroy", image_id)
            sync_all()
            converted.append(convert(disk))
            synced.append(converted[-1] + fsync(copy))
            copy.unlink()
        floor = [median_time(lambda: subprocess.run([PYTHON, "-c", "import libvirt"],
                                                    check=True), 1) for _ in range(3)]
        bare = [median_time(lambda: subprocess.run([PYTHON, "-c", "pass"], check=True), 1)
                for _ in range(3)]
        helped = [median_time(lambda: subprocess.run([*bbsnap, "servers", "snapshot", "--help"],
                                                     check=True, capture_output=True), 1)
                  for _ in range(3)]
        return {"until": statistics.median(until), "convert": statistics.median(converted),
                "served": statistics.median(served),
                "floor": statistics.median(floor), "bare": statistics.median(bare),
                "help": statistics.median(helped),
                "durable": statistics.median(synced),
                "job": statistics.median(job) if job else None,
                "steps": {label: statistics.median(v) for label, v in steps.items() if v},
                "latency": {label: statistics.median(v) for label, v in latency.items() if v}}

    full: dict[str, dict[str, object]] = {}
    cli: dict[str, float] = {}
    api: dict[str, float] = {}
    virsh_time = 0.0
    floor: dict[str, float] = {}
    own = (0.0, 0.0)
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

        # Full copies, one guest at a time (two TCG guests on two cores would starve the
        # copy of CPU time).
        for label, disk in (("64 MiB disk", small_disk), ("8 GiB disk, 1 GiB data", big_disk)):
            domain = boot("full", disk)
            full[label] = full_copy(domain, disk)
            stop(domain)
        if not only_full_copy:
            small, big = boot("small", small_disk), boot("big", big_disk)
            images: list[str] = []
            for domain in (small, big):
                cli[domain] = median_time(lambda d=domain: images.append(bbsnap_snapshot(d)),
                                          RUNS, lambda: (wait_available(images[-1]),
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

            # The floor under any Python command that snapshots through libvirt-python: start
            # the interpreter (with this installation's site-packages) and import libvirt.
            def python(code: str) -> None:
                subprocess.run([PYTHON, "-c", code], check=True)

            floor = {"start": median_time(lambda: python("pass"), RUNS),
                     "libvirt": median_time(lambda: python("import libvirt"), RUNS)}

            from bbsnap.cli.context import AppContext
            from bbsnap.services.snapshots.start import SnapshotRequest

            service = AppContext(overrides={}).snapshots()
            for domain in (small, big):
                api[domain] = median_time(
                    lambda d=domain: images.append(service.begin(SnapshotRequest(server=d)).id),
                    RUNS, lambda: (wait_available(images[-1]), run("images", "destroy", images.pop())))
            stop(small)
            stop(big)

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
    if not only_full_copy:
        print(f"{'virsh snapshot-create-as --disk-only (64 MiB disk)':58} "
              f"{virsh_time * 1000:7.1f}ms  1.00")
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
        until, converted = own
        print(f"{'qemu-img convert -W of its disk (bbsnap server, 1 GiB image)':58} "
              f"{converted * 1000:7.1f}ms  1.00")
        print(f"{'  snapshot until available':58} {until * 1000:7.1f}ms  {until / converted:.2f} "
              f"vs convert (goal <= 1.5: {verdict(until / converted <= 1.5)})")
    for label, figures in full.items():
        until, converted, durable = (float(figures[k]) for k in ("until", "convert", "durable"))
        print(f"{'full copy, ' + label + ': qemu-img convert -W -O qcow2':58} "
              f"{converted * 1000:7.1f}ms")
        print(f"{'  convert -W, then fsync of its output (the baseline)':58} "
              f"{durable * 1000:7.1f}ms  1.00")
        print(f"{'  snapshot until available (durable)':58} {until * 1000:7.1f}ms  "
              f"{until / durable:.2f} vs convert+fsync (goal <= 1.3: "
              f"{verdict(until / durable <= 1.3)}), {until / converted:.2f} vs convert")
        served = float(figures["served"])
        print(f"{'  the same through the command server':58} {served * 1000:7.1f}ms  "
              f"{served / durable:.2f} vs convert+fsync (goal <= 1.3: "
              f"{verdict(served / durable <= 1.3)})")
        floor_time = float(figures["floor"])
        print(f"{'    floor: one python3 start-up + import libvirt':58} {floor_time * 1000:7.1f}ms  "
              f"{floor_time / durable:.2f} vs convert+fsync")
        if figures["job"] is not None:
            print(f"{'    of which QEMU backup job (libvirt time_elapsed)':58} "
                  f"{float(figures['job']) * 1000:7.1f}ms")
        steps = figures["steps"]
        assert isinstance(steps, dict)
        for step, seconds in steps.items():
            print(f"{'    ' + step:58} {seconds * 1000:7.1f}ms")
        latency = figures["latency"]
        assert isinstance(latency, dict)
        print(f"{'  the command (quiesced), step by step: sum of medians':58} "
              f"{sum(latency.values()) * 1000:7.1f}ms")
        print(f"{'    floor: python3 -c pass':58} {float(figures['bare']) * 1000:7.1f}ms")
        print(f"{'    floor: servers snapshot --help (start-up, CLI imports)':58} "
              f"{float(figures['help']) * 1000:7.1f}ms")
        described = dict(COMMAND_STEPS)
        for step, seconds in latency.items():
            print(f"{'    ' + described[step]:58} {seconds * 1000:7.1f}ms")
    if not only_full_copy:
        # The guest's view and the CLI against quiescing virsh, on guests of their own.
        import bench_guest_view
        bench_guest_view.main()


def worker_timeline(log: Path, prefix: str = PREFIX) -> Timeline | None:
    """The timeline the worker writes into its log just after the image turned available
    (or, with COMMAND_PREFIX, the one the command wrote before it returned)."""
    from bbsnap.services.snapshots import timeline

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = (timeline.parse(log.read_text(errors="replace"), prefix) if log.exists()
                 else None)
        if found is not None:
            return found
        time.sleep(0.05)
    return None


def sync_all() -> None:
    """Write out every dirty page first, so an fsync measures only its own file's data."""
    subprocess.run(["sync"], check=True)


if __name__ == "__main__":
    main()
