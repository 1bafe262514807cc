#!/usr/bin/env python3
"""Benchmark: memory-state snapshots (`servers snapshot --memory`, `servers revert`).

On the tiny real guest (TCG) at 256 MiB and at 1 GiB of RAM, in one run on one machine:
  - the guest-visible pause of `snapshot --memory`: the guest runs a tight loop (started
    through its agent) printing a line on its serial console every 5 ms; the console log
    is polled every millisecond and the longest gap between two lines arriving during the
    snapshot, less the loop's usual gap, is the time the guest did not run (its own clock
    cannot tell: under TCG the guest's clocks stop while it is paused);
  - the time until the image is available (the command's start to `available`);
  - revert-to-running (`servers revert SRV IMG` until the command returns, guest running)
    against `virsh restore` of a `virsh save` file of the same guest, timed the same way.
Then the breakdowns, each step timed in this process on the same guests:
  - the pause: libvirt's lifecycle events give when QEMU stopped the guest and when it ran
    again; of that, QEMU's final pass (the completed job's "downtime"), libvirt ending the
    save (QEMU stopped to snapshotCreateXML returning, less the final pass), the internal
    qcow2 snapshot (qemu-img) and the resume call, driven through the port as
    services/snapshots/memory.py does; and the longest stall of the guest *outside* the
    pause, until the image is available (the worker's copy and its internal-snapshot
    delete run beside the guest);
  - the revert, from the timeline each memory revert writes into logs/revert-UUID.log
    (services/memory_restore.py): the process's start, its imports, connection and
    look-ups, the header check, the lock, the journal, the new overlay, waiting for the
    memory file's check, the destroy, the definition, the restore (streamed from a FIFO),
    the catalogue work after it and the process's exit; beside it, the old path's two
    steps timed here on the same file: unpacking it, then restore_memory from the file.
Each round takes its reverts (through a command server, in their own process), the old
path and `virsh restore` in a shuffled order (seeded: the same order each run).
The CLI's bytecode is compiled first, as an installed package's is (a checkout run with
PYTHONDONTWRITEBYTECODE compiles every module of every command: about 0.12 s each).
Goals: pause <= 200 ms and not more than 1.5x larger at 1 GiB than at 256 MiB; revert
<= 1.5x `virsh restore`. Each figure is the median of RUNS runs. Needs libvirtd; on a
shared host run it under the libvirtd lock the tests use.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import BBSNAP, bench_dir, cli_runner, command_server, compile_checkout, guest_env

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bbsnap.hypervisor import qemu_exit
from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor
from bbsnap.services import memory_file
from bbsnap.services.snapshots import timeline
from bbsnap.models import SnapshotDisk, SnapshotJob
from bbsnap.services.snapshots import memory
from bbsnap.state.layout import DataDir
from bbsnap.tinyguest import READY_LINE, build_tiny_guest

RUNS = 3
# The revert and virsh restore vary most here (restoring one save file took 0.29-0.69 s in
# one run: see SLOW_KERNEL).
REVERT_RUNS = 7
# A restore whose QEMU spent more than this in the kernel zeroed huge pages that this
# machine's own host had not backed yet: 0.29-0.47 s against 0.10-0.15 s, with the same 69
# huge-page faults, at random, on every restore path alike (fifteenth session).
SLOW_KERNEL = 0.25
SIZES = (256, 1024)
TICK = "BBSNAP-TICK"
LOOP = f"while :; do echo {TICK}; usleep 5000; done >/dev/console 2>&1"
VIRSH = ["virsh", "-q", "-c", "qemu:///system"]


class ConsoleWatch:
    """Host arrival times of the guest's tick lines, polled every millisecond."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.arrivals: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        while not self._stop.is_set():
            try:
                with self.log.open("rb") as stream:
                    if self.log.stat().st_size < offset:
                        offset = 0  # a restarted QEMU truncates the log
                    stream.seek(offset)
                    data = stream.read()
            except OSError:
                data = b""
            if data:
                now = time.monotonic()
                offset += len(data)
                self.arrivals += [now] * data.count(TICK.encode())
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def longest_gap(self, start: float, end: float) -> float:
        times = [t for t in self.arrivals if start <= t <= end]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return max(gaps) if gaps else float("nan")

    def gap_over(self, instant: float) -> float:
        """The gap between the two lines either side of *instant* (the guest's pause)."""
        before = [t for t in self.arrivals if t <= instant]
        after = [t for t in self.arrivals if t > instant]
        return after[0] - before[-1] if before and after else float("nan")

    def longest_gap_outside(self, start: float, end: float, pause: tuple[float, float]) -> float:
        times = [t for t in self.arrivals if start <= t <= end]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)
                if b < pause[0] or a > pause[1]]
        return max(gaps) if gaps else 0.0

    def usual_gap(self, before: float) -> float:
        times = [t for t in self.arrivals if t < before][-200:]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > a]
        return statistics.median(gaps) if gaps else 0.0


class Lifecycle:
    """Host times of libvirt's SUSPENDED and RESUMED events, per domain (an event loop in
    a thread of this process, on its own connection)."""

    def __init__(self) -> None:
        import libvirt

        self.seen: list[tuple[float, str, int]] = []
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=self._loop, daemon=True).start()
        self.conn = libvirt.open("qemu:///system")
        self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            lambda _c, dom, event, _d, _o: self.seen.append((time.monotonic(), dom.name(),
                                                             event)), None)

    @staticmethod
    def _loop() -> None:
        import libvirt

        while True:
            libvirt.virEventRunDefaultImpl()

    def pause(self, domain: str, start: float) -> tuple[float, float] | None:
        """The first stop after *start* and the resume after it."""
        import libvirt

        stops = [t for t, d, e in self.seen if d == domain and t >= start
                 and e == libvirt.VIR_DOMAIN_EVENT_SUSPENDED]
        if not stops:
            return None
        resumes = [t for t, d, e in self.seen if d == domain and t > stops[0]
                   and e == libvirt.VIR_DOMAIN_EVENT_RESUMED]
        return (stops[0], resumes[0]) if resumes else None

    def final_pass_ms(self, domain: str) -> float:
        """QEMU's own downtime figure of the domain's last completed job (the save)."""
        import libvirt

        stats = self.conn.lookupByName(domain).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        return float(stats.get("downtime", float("nan")))


STEPS_IMAGE = "img-steps"  # the image id the step-by-step captures are made under


class _LocksUnseen:
    """In place of memory.image_lock: QEMU's image locks never seen, so memory.capture
    makes the disk states only once the save returned (its path before they were watched,
    and still its path where the locks cannot be seen): the same-run baseline."""

    @staticmethod
    def held_for_writing(path: Path) -> bool:
        return False


def pause_steps(hv: LibvirtHypervisor, events: Lifecycle, srv: str, work: Path,
                watch_locks: bool = True) -> dict[str, float]:
    """One capture as `servers snapshot --memory` makes it (memory.capture, through the
    port), timed from the marks it leaves in the command's timeline and libvirt's events;
    with *watch_locks* False, as if QEMU's image locks could not be seen."""
    disks = hv.disks(srv)
    writable = [d for d in disks if d.writable]
    data = DataDir(work / "steps").ensure()
    job = SnapshotJob(domain=srv, domain_uuid=hv.info(srv).uuid, mode="memory", disks=tuple(
        SnapshotDisk(d.target, d.path, "qcow2", str(data.tmp_dir / f"{d.target}.qcow2"))
        for d in writable))
    timeline.COMMAND.clear()
    begun, begun_wall = time.monotonic(), time.time()
    watched = memory.image_lock
    memory.image_lock = watched if watch_locks else _LocksUnseen  # type: ignore[assignment]
    try:
        memory.capture(hv, data, STEPS_IMAGE, job, [d.target for d in disks if not d.writable],
                       hv.hardware(srv).memory_kib * 1024)
    finally:
        memory.image_lock = watched
    marks = {label: begun + (at - begun_wall) for label, at in timeline.COMMAND.marks}
    timeline.COMMAND.clear()
    time.sleep(0.2)  # the RESUMED event's delivery
    window = events.pause(srv, begun)
    final = events.final_pass_ms(srv)
    memory.forget_disk_states(hv, job, STEPS_IMAGE)
    save = memory.raw_file(data, STEPS_IMAGE)
    assert save is not None
    raw_size = save.stat().st_size
    save.unlink()
    stopped = window[0] if window else float("nan")
    returned, made = marks["memory-saved"], marks["disk-states"]
    return {"paused": (window[1] - window[0]) * 1000 if window else float("nan"),
            "live copy": (stopped - begun) * 1000, "final pass": final,
            "libvirt ends the save": (returned - stopped) * 1000 - final,
            # 0 when made while libvirt ended the save (QEMU's image locks released)
            "internal snapshot": (made - returned) * 1000,
            "made early": 1.0 if "disks-released" in marks else 0.0,
            "released before return": ((returned - marks["disks-released"]) * 1000
                                       if "disks-released" in marks else float("nan")),
            "resume": (marks["resumed"] - made) * 1000, "raw": raw_size}


def qemu_kernel_seconds(domain: str) -> float:
    """The system CPU time of the domain's QEMU so far (NaN where its pid cannot be read)."""
    try:
        pid_file = qemu_exit.pid_file("qemu:///system", domain)
        if pid_file is None:
            return float("nan")
        pid = int(pid_file.read_text())
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[12]) / os.sysconf("SC_CLK_TCK")  # stime, the stat's 15th field
    except (OSError, ValueError, IndexError):
        return float("nan")


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


# The revert's timeline marks in order, each with the name of the step that ends at it.
REVERT_STEPS = (("started", "process start"), ("revert", "imports+connect+look-ups"),
                ("checked", "header check"), ("locked", "lock"), ("journaled", "journal"),
                ("overlays", "overlay"), ("verified", "file check wait"),
                ("destroyed", "destroy"), ("defined", "definition"), ("unpacked", "unpack"),
                ("restored", "restore"), ("done", "catalogue"), ("returned", "exit"))


def revert_steps(log: Path, begun: float, returned: float) -> dict[str, float]:
    """Seconds of each step of the revert whose timeline *log* holds, from the command's
    start (*begun*, wall clock) to its return."""
    found = timeline.parse(log.read_text()) if log.exists() else None
    if found is None:
        raise SystemExit(f"the revert wrote no timeline into {log}")
    marks = dict(found.marks)
    marks["returned"] = returned
    steps, last = {step: 0.0 for _, step in REVERT_STEPS}, begun
    for label, step in REVERT_STEPS:
        if label in marks:
            steps[step] = marks[label] - last
            last = marks[label]
    steps["streamed"] = found.durations.get("streamed", 0.0)
    return steps


def main() -> None:
    # As installed: bytecode compiled once (pip does it at install time).
    compile_checkout()
    work = bench_dir()
    env = guest_env(work)
    run = cli_runner(env)
    hv = LibvirtHypervisor("qemu:///system")
    events = Lifecycle()

    def wait_line(log: Path, wanted: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and wanted in log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise SystemExit(f"{wanted} did not appear in {log}")

    def start_ticks(server: str) -> None:
        command = {"execute": "guest-exec",
                   "arguments": {"path": "/bin/sh", "arg": ["-c", LOOP + " &"]}}
        subprocess.run([*VIRSH, "qemu-agent-command", server, json.dumps(command)],
                       check=True, capture_output=True)

    results: dict[int, dict[str, float]] = {}
    servers: list[str] = []
    try:
        image = run("images", "import", str(build_tiny_guest()), "--name", "tiny")
        for size in SIZES:
            (server,) = json.loads(run("servers", "create", image, "--memory", str(size),
                                       "--format", "json"))
            srv = server["id"]
            servers.append(srv)
            log = work / "data" / "servers" / srv / "console.log"
            wait_line(log, READY_LINE)
            watch = ConsoleWatch(log)
            start_ticks(srv)
            time.sleep(2.0)
            cli: list[dict[str, float]] = []
            snapshots = []
            for _ in range(RUNS):
                begun = time.monotonic()
                image_id = run("servers", "snapshot", srv, "--memory")
                returned = time.monotonic()
                while json.loads(run("images", "show", image_id, "--format", "json"))[
                        "state"] == "creating":
                    time.sleep(0.05)
                available = time.monotonic()
                time.sleep(0.5)
                window = events.pause(srv, begun)
                usual = watch.usual_gap(begun)
                if window is not None:
                    pause = watch.gap_over(window[0]) - usual
                    other = watch.longest_gap_outside(begun, available, window) - usual
                else:  # no events seen: the longest gap, as before
                    pause = watch.longest_gap(begun, returned + 0.3) - usual
                    other = float("nan")
                cli.append({"pause": pause * 1000, "available": available - begun,
                            "other stall": max(0.0, other) * 1000,
                            "paused": ((window[1] - window[0]) * 1000 if window
                                       else float("nan"))})
                snapshots.append(image_id)
            # Interleaved: the disk states made while libvirt ends the save, and after it.
            both = [pause_steps(hv, events, srv, work, watch_locks=i % 2 == 0)
                    for i in range(2 * RUNS)]
            steps, after_save = both[0::2], both[1::2]
            watch.stop()
            stored = work / "data" / "images" / f"{snapshots[-1]}{memory_file.SUFFIX}"
            reverts, restores, unpacks, own_restores, served = [], [], [], [], []
            kernel: dict[str, list[float]] = {"revert": [], "restore": [], "virsh": []}
            breakdowns = []
            save_file = work / f"{srv}.save"
            revert_log = work / "data" / "logs" / f"revert-{server['uuid']}.log"
            unpacked = work / f"{srv}.unpacked.save"
            # Each round runs its four measurements in its own order: in a fixed one, each
            # met what the one before it left (a guest restored a moment ago, a command
            # server just stopped, a save file's pages just written), and the 1 GiB revert's
            # restore step was 0.37-0.39 s against the file's 0.30 s in three runs in a row,
            # where interleaved at random in one process it was 0.331 against 0.340 s
            # (sixteenth session).
            order = random.Random(size)
            for _ in range(REVERT_RUNS):
                for measure in order.sample(["served", "own", "old path", "virsh"], 4):
                    if measure == "served":
                        # The same revert through a command server (`command-server start`).
                        with command_server(env, work) as through_server:
                            begun = time.monotonic()
                            through_server("servers", "revert", srv, snapshots[-1])
                            served.append(time.monotonic() - begun)
                    elif measure == "own":
                        # In the command's own process, as without a server.
                        begun, begun_wall = time.monotonic(), time.time()
                        run("servers", "revert", srv, snapshots[-1])
                        reverts.append(time.monotonic() - begun)
                        kernel["revert"].append(qemu_kernel_seconds(srv))
                        breakdowns.append(revert_steps(revert_log, begun_wall, time.time()))
                    elif measure == "old path":
                        # The revert's two big steps on their own: the unpack, then the
                        # restore onto the server's disk now (what the revert gives
                        # restore_memory).
                        begun = time.monotonic()
                        memory_file.unpack(stored, unpacked)
                        unpacks.append(time.monotonic() - begun)
                        (disk,) = [d for d in hv.disks(srv) if d.writable]
                        hv.destroy(srv)
                        begun = time.monotonic()
                        hv.restore_memory(unpacked, {disk.target: Path(disk.path)})
                        own_restores.append(time.monotonic() - begun)
                        kernel["restore"].append(qemu_kernel_seconds(srv))
                        unpacked.unlink()
                    else:
                        subprocess.run([*VIRSH, "save", srv, str(save_file)], check=True,
                                       capture_output=True)
                        begun = time.monotonic()
                        subprocess.run([*VIRSH, "restore", str(save_file)], check=True,
                                       capture_output=True)
                        restores.append(time.monotonic() - begun)
                        kernel["virsh"].append(qemu_kernel_seconds(srv))
                        save_file.unlink()
            results[size] = {**median_of(cli), **{f"step {k}": v
                                                  for k, v in median_of(steps).items()},
                             "revert": statistics.median(reverts),
                             "revert served": statistics.median(served),
                             "virsh restore": statistics.median(restores),
                             "unpack": statistics.median(unpacks),
                             "restore": statistics.median(own_restores),
                             **{f"revert {k}": v for k, v in median_of(breakdowns).items()},
                             "early runs": int(sum(step["made early"] for step in steps)),
                             **{f"after {k}": v for k, v in median_of(after_save).items()},
                             "stored": stored.stat().st_size,
                             **{f"kernel {k}": statistics.median(v) for k, v in kernel.items()},
                             **{f"slow {k}": float(sum(t > SLOW_KERNEL for t in v))
                                for k, v in kernel.items()}}
            # Gone before the next size's guest: its tick loop kept one of the two cores
            # busy, and the 1 GiB revert's restore (QEMU beside its feeder thread) paid for
            # it (0.37-0.39 s against the file's 0.30 s, sixteenth session), not the file's.
            subprocess.run([*BBSNAP, "servers", "destroy", srv], env=env, check=True,
                           capture_output=True)
            servers.remove(srv)
    finally:
        for srv in servers:
            subprocess.run([*BBSNAP, "servers", "destroy", srv], env=env, capture_output=True)
        hv.close()
        shutil.rmtree(work, ignore_errors=True)

    print(f"memory snapshots on the tiny guest (TCG), median of {RUNS} runs ({REVERT_RUNS} for "
          "the reverts and virsh restore)")
    for size, r in results.items():
        print(f"  {size:5d} MiB: guest-visible pause {r['pause']:6.0f} ms {_goal(r['pause'], 200)}  "
              f"available after {r['available']:5.2f} s  memory file "
              f"{r['stored'] / 2**20:6.1f} MiB (raw {r['step raw'] / 2**20:.1f} MiB)")
        print(f"             paused (QEMU's STOP to RESUME events) {r['paused']:4.0f} ms; "
              f"longest other stall until available {r['other stall']:4.0f} ms")
        print(f"             the pause step by step {r['step paused']:4.0f} ms: final pass "
              f"{r['step final pass']:3.0f} + libvirt ends the save "
              f"{r['step libvirt ends the save']:3.0f} + internal snapshot "
              f"{r['step internal snapshot']:3.0f} + resume {r['step resume']:3.0f} ms "
              f"(after a live copy of {r['step live copy']:4.0f} ms)")
        print(f"             disk states made while libvirt ended the save (QEMU's image "
              f"locks released): {r['early runs']} of {RUNS} step-by-step captures, "
              f"released {r['step released before return']:3.0f} ms before the save returned")
        print(f"             the same, the disk states made after the save (interleaved): "
              f"{r['after paused']:4.0f} ms: final pass {r['after final pass']:3.0f} + libvirt "
              f"ends the save {r['after libvirt ends the save']:3.0f} + internal snapshot "
              f"{r['after internal snapshot']:3.0f} + resume {r['after resume']:3.0f} ms; "
              f"paused {r['step paused'] / r['after paused']:4.2f}x of that")
        print(f"             revert to running {r['revert']:5.3f} s  virsh restore "
              f"{r['virsh restore']:5.3f} s  ratio {r['revert'] / r['virsh restore']:5.3f}x "
              f"{_goal(r['revert'] / r['virsh restore'], 1.5)}")
        print(f"             the same revert through the command server {r['revert served']:5.3f} s"
              f"  ratio {r['revert served'] / r['virsh restore']:5.3f}x "
              f"{_goal(r['revert served'] / r['virsh restore'], 1.5)}")
        steps = [(step, r[f"revert {step}"]) for _, step in REVERT_STEPS
                 if r[f"revert {step}"] > 0]
        print("             the revert (medians of each step, s): "
              + " + ".join(f"{step} {seconds:4.2f}" for step, seconds in steps))
        how = "from a FIFO" if r["revert streamed"] else "from an unpacked file"
        print(f"             its restore ran {how}; the old path on the same file: unpack "
              f"{r['unpack']:4.2f} s + restore from the file {r['restore']:4.2f} s")
        print(f"             QEMU's kernel time in each restore (median, s): revert "
              f"{r['kernel revert']:4.2f}, the old path {r['kernel restore']:4.2f}, virsh restore "
              f"{r['kernel virsh']:4.2f}; over {SLOW_KERNEL} s (huge pages the host had not "
              f"backed): {r['slow revert']:.0f}, {r['slow restore']:.0f} and {r['slow virsh']:.0f} of "
              f"{REVERT_RUNS}")
    small, large = (results[s]["pause"] for s in SIZES)
    print(f"  pause at {SIZES[1]} MiB / at {SIZES[0]} MiB: {large / small:4.2f}x "
          f"{_goal(large / small, 1.5)}")
    small, large = (results[s]["paused"] for s in SIZES)
    print(f"  paused (events) at {SIZES[1]} MiB / at {SIZES[0]} MiB: {large / small:4.2f}x")


def _goal(value: float, bound: float) -> str:
    """"(goal <= bound: met)", or MISSED: the verdict on the exact figure, not the printed one."""
    return f"(goal <= {bound:g}{'x' if bound < 10 else ''}: {'met' if value <= bound else 'MISSED'})"


if __name__ == "__main__":
    main()
